import json

import pytest

from optimalsteps import OptimalStepsError
from optimalsteps.cli import main
from optimalsteps.evaluation.demo import run_demo

pytest.importorskip("safetensors")


def test_demo_end_to_end_in_reduced_mode(tmp_path):
    report = run_demo(tmp_path / "demo", steps=(3,), solvers=("euler",), schedules=("oss", "uniform", "karras"),
                      samples=2, eval_samples=8, teacher_steps=12, progress=False)
    text = report.read_text()
    assert "## Headline" in text and "euler, 3 steps: OSS MSE" in text
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {r["schedule"] for r in rows} == {"oss", "uniform", "karras"}
    assert all(r["fd"] is not None and r["mse"] is not None for r in rows)  # digits: classifier-feature FD
    assert (tmp_path / "demo" / "samples_euler_3.png").exists() and "samples_euler_3.png" in text
    with pytest.raises(OptimalStepsError, match="already exists"):
        run_demo(tmp_path / "demo", steps=(3,), solvers=("euler",), schedules=("uniform",), samples=2,
                 eval_samples=8, teacher_steps=12, progress=False)


def test_demo_cli_bad_input(tmp_path, capsys):
    assert main(["demo", "--model", "nosuch", "--out", str(tmp_path / "d")]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "d")]) == 2
