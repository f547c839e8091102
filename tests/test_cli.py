import json
import subprocess
import sys

import numpy as np
import pytest

from optimalsteps.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_writes_samples(tmp_path, capsys):
    out = tmp_path / "x.npy"
    code, stdout, _ = run(capsys, "sample", "--model", "gmm:dim=4,components=2", "--steps", "5", "--samples", "3",
                          "--solver", "heun", "--out", str(out))
    assert code == 0 and "9 NFE" in stdout
    assert np.load(out).shape == (3, 4)
    code, _, err = run(capsys, "sample", "--model", "gmm:dim=4,components=2", "--out", str(out))
    assert code == 2 and "already exists" in err


def test_sample_with_given_noise_and_schedule_file(tmp_path, capsys):
    np.save(tmp_path / "n.npy", np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    (tmp_path / "s.json").write_text(json.dumps({"format": "optimalsteps.schedule.v1", "process": "flow",
                                                 "times": [1.0, 0.5, 0.0]}))
    code, stdout, _ = run(capsys, "sample", "--model", "gmm:dim=4,components=2", "--noise", str(tmp_path / "n.npy"),
                          "--schedule", str(tmp_path / "s.json"), "--out", str(tmp_path / "o.npy"))
    assert code == 0 and "2 steps" in stdout and np.load(tmp_path / "o.npy").shape == (2, 4)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--solver", "rk4"], "invalid choice: 'rk4'"),
    (["sample", "--model", "gmm:dim=0"], "at least 1"),
    (["sample", "--schedule", "nonsense"], "unknown schedule 'nonsense'"),
    (["sample", "--steps", "0"], "expected a number >= 1"),
    (["sample", "--model", "nope"], "unknown model 'nope'"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_noise_and_schedule_files(tmp_path, capsys):
    np.save(tmp_path / "n.npy", np.zeros((2, 3), dtype=np.float32))
    code, _, err = run(capsys, "sample", "--model", "gmm:dim=4", "--noise", str(tmp_path / "n.npy"))
    assert code == 2 and "has shape [2, 3], expected [B, 4]" in err
    (tmp_path / "s.json").write_text(json.dumps({"format": "optimalsteps.schedule.v1", "process": "flow",
                                                 "times": [1.0, 0.2, 0.5, 0.0]}))
    code, _, err = run(capsys, "sample", "--schedule", str(tmp_path / "s.json"))
    assert code == 2 and "not strictly decreasing" in err


def test_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optimalsteps", "sample", "--model", "gmm:process=edm"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "optimalsteps: error: unknown process 'edm'; known: flow, vp, ve"
