"""Hostile input: bad arguments, damaged files, foreign checkpoints, kills and concurrent runs.

Every refusal is one line naming the problem (exit 2 from the CLI, no traceback), comes before any
expensive work, and leaves the user's files byte-identical and no temporary files behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, Schedule, draw_noise, load_model, sample, search
from optimalsteps.evaluation.baselines import make_schedule
from optimalsteps.evaluation.compare import compare
from optimalsteps.optimize.checkpoint import model_fingerprint
from optimalsteps.optimize.options import Checkpointing, CostView, DPOptions, Storage

ROOT = Path(__file__).resolve().parents[1]
SEARCH = dict(steps=3, teacher_steps=12)


@pytest.fixture(scope="module")
def model():
    return GaussianMixture.random(dim=6, components=3, seed=1)


@pytest.fixture(scope="module")
def noise(model):
    return draw_noise(model, 4, 0)


def _view(**view):
    return DPOptions(view=CostView(**view))


def _ckpt(path, resume=False):
    return Checkpointing(str(path), resume=resume)


def _uniform(steps=4):
    return make_schedule("uniform", "flow", steps)


# ------------------------------------------------------------------------------------ the API

@pytest.mark.parametrize("call,message", [
    (lambda m, n: search(m, torch.randn(4, 5), **SEARCH), r"shape \[4, 5\], expected \[B, 6\]"),
    (lambda m, n: search(m, n[0], **SEARCH), r"shape \[B, \.\.\.\]"),
    (lambda m, n: search(m, n.tolist(), **SEARCH), "must be a tensor"),
    (lambda m, n: search(m, n.long(), **SEARCH), "real floating-point values, got torch.int64"),
    (lambda m, n: sample(m, n.to(torch.complex64), _uniform()), "real floating-point values, got torch.complex64"),
    (lambda m, n: sample(m, n.numpy().astype(np.int32), _uniform()), "real floating-point values, got numpy int32"),
    (lambda m, n: sample(m, n, "karras"), "got the name 'karras'; make one with make_schedule"),
    (lambda m, n: search(m, n, **SEARCH, teacher_grid="uniform"), "teacher grid must be a Schedule"),
    (lambda m, n: search(m, n, **SEARCH, storage=Storage(max_batch=0)), "max_batch must be a whole number >= 1, got 0"),
    (lambda m, n: search(m, n, **SEARCH, dp=_view(channels=[99])), r"cost_channels \[99\] out of range"),
    (lambda m, n: search(m, n, **SEARCH, dp=_view(frames=[0])), "cost_frames needs 4-d samples"),
    (lambda m, n: search(m, n, **SEARCH, storage=Storage(dtype=torch.int8)), "storage dtype must be one of"),
    (lambda m, n: search(m, n, **SEARCH, storage=Storage(target_chunk=0)), "target_chunk must be a whole number >= 1"),
    (lambda m, n: search(m, n, **SEARCH, refine=True, refine_budget=-5), "refine_budget must be at least 0"),
    (lambda m, n: search(m, n, **SEARCH, storage=Storage(memory_limit="1GB")), "memory_limit .* must be a whole number, got '1GB'"),
    (lambda m, n: search(m, n, **SEARCH, seed=2**70), r"seed must be a whole number in \[0, 2\*\*63\)"),
    (lambda m, n: draw_noise(m, 4, -1), "seed must be a whole number"),
    (lambda m, n: draw_noise(m, 0, 0), "number of samples must be at least 1"),
    (lambda m, n: draw_noise(m, 10**12, 0), "more than 1000000; pass --allow-huge"),
    (lambda m, n: draw_noise(m, 10**12, 0, allow_huge=True), "needs .* GiB but .* GiB of memory is available"),
    (lambda m, n: load_model(5), "model spec must be a string"),
    (lambda m, n: load_model("gmm:dim=1000000000000"), "dimension 1000000000000 needs .* GiB"),
    (lambda m, n: compare(m, [2], samples=0, teacher_steps=8), "number of samples must be at least 1"),
    (lambda m, n: compare(m, 2, teacher_steps=8), "lists of step counts"),
])
def test_api_refuses_bad_arguments_in_one_sentence(model, noise, call, message):
    with pytest.raises(OptimalStepsError, match=message) as info:
        call(model, noise)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("build,message", [
    (lambda: Schedule("karras", "flow"), "got the name 'karras'"),
    (lambda: Schedule([1.0, 0.0], "flow", metadata=[1, 2]), "metadata must be a JSON object, got list"),
    (lambda: Schedule([1.0, 0.0], "flow", metadata="abc"), "metadata must be a JSON object, got str"),
    (lambda: Schedule([1.0, 0.0], "flow", metadata={"noise_scale_time": "zz"}), "'noise_scale_time' must be a number"),
    (lambda: Schedule([1.0, 0.0], "flow", solver=3), "solver must be a name"),
    (lambda: make_schedule("karras", "flow", 5, rho="abc"), "karras rho must be a number, got 'abc'"),
    (lambda: make_schedule("karras", "flow", 5, rho=0), "karras rho must be a finite positive number, got 0"),
    (lambda: make_schedule("shift", "flow", 5, mu=1e6), r"shift mu must be a finite number in \[-30, 30\]"),
    (lambda: make_schedule("beta", "flow", 5, a=-1), "beta a must be a finite positive number, got -1"),
    (lambda: make_schedule("logsnr", "flow", 5, sigma_min="x"), "schedule 'logsnr' cannot use sigma_min='x'"),
    (lambda: make_schedule(["karras"], "flow", 5), "schedule name must be a string"),
])
def test_schedules_refuse_bad_values_by_name(build, message):
    with pytest.raises(OptimalStepsError, match=message):
        build()


def test_numpy_noise_of_any_byte_order_and_precision_just_works(model, noise):
    schedule = _uniform()
    reference = sample(model, noise.double(), schedule).samples
    for array in (noise.double().numpy().astype(">f8"), noise.double().numpy().astype(np.longdouble)):
        out = sample(model, array, schedule).samples
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_user_model_factories_fail_in_one_line(tmp_path):
    (tmp_path / "user.py").write_text(
        "import sys\nfrom optimalsteps import GaussianMixture\n"
        "def raises():\n    raise RuntimeError('boom')\n"
        "def needs(x):\n    return x\n"
        "def exits():\n    sys.exit(0)\n"
        "def negative():\n    m = GaussianMixture.random(dim=4, components=2)\n    m.sample_shape = (-3,)\n    return m\n")
    for name, message in (("raises", "raised RuntimeError: boom"), ("needs", "raised TypeError"),
                          ("exits", r"called sys.exit\(0\) instead of returning a model"),
                          ("negative", r"sample_shape must be positive whole numbers, got \(-3,\)")):
        with pytest.raises(OptimalStepsError, match=message):
            load_model(f"python:{tmp_path / 'user.py'}:{name}")


def test_mixture_files_with_empty_means_are_refused(tmp_path):
    for means, message in (([], r"must be \[K\]\[D\]"), ([[]], "at least one dimension")):
        path = tmp_path / "mix.json"
        path.write_text(json.dumps({"weights": [1.0], "means": means, "stds": [1.0]}))
        with pytest.raises(OptimalStepsError, match=message):
            load_model(f"gmm:{path}")


# ------------------------------------------------------------------------------------ checkpoints

def _mixture_file(path, shift=0.0):
    mix = GaussianMixture.random(dim=6, components=3, seed=1)
    data = mix.to_json()
    data["means"] = (np.asarray(data["means"]) + shift).tolist()
    path.write_text(json.dumps(data))
    return path


def _crash_after(layer):
    def callback(stage, done, total):
        if stage == "layer" and done == layer:
            raise KeyboardInterrupt
    return callback


def test_model_fingerprint_follows_contents_not_identity(tmp_path, model):
    assert model_fingerprint(model) == model_fingerprint(GaussianMixture.random(dim=6, components=3, seed=1))
    assert model_fingerprint(model) != model_fingerprint(GaussianMixture.random(dim=6, components=3, seed=2))
    net = torch.nn.Linear(3, 3)
    before = model_fingerprint(net)
    with torch.no_grad():
        net.weight[0, 0] += 1e-6
    assert model_fingerprint(net) != before

    class Own:
        def fingerprint(self):
            return "v1"
    assert model_fingerprint(Own()) == "v1"



def test_very_large_tensors_are_fingerprinted_from_a_sample(monkeypatch):
    from optimalsteps.optimize import checkpoint

    monkeypatch.setattr(checkpoint, "_SAMPLED_ABOVE_HOST", 1000)
    weights = torch.arange(10_000, dtype=torch.float32)
    before = checkpoint.fingerprint(weights)
    assert checkpoint.fingerprint(weights.clone()) == before
    weights[0] += 1  # the strided sample starts at the first element
    assert checkpoint.fingerprint(weights) != before
    assert checkpoint.fingerprint(weights.reshape(100, 100)) != checkpoint.fingerprint(weights)  # shape counts


def test_resume_refuses_a_changed_model_and_foreign_files(tmp_path, noise):
    mix = _mixture_file(tmp_path / "mix.json")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpointing=_ckpt(ckpt), callback=_crash_after(2))
    _mixture_file(mix, shift=1e-3)  # edited between the runs
    with pytest.raises(OptimalStepsError, match="model_fingerprint: '[0-9a-f]+' in the checkpoint"):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpointing=_ckpt(ckpt, resume=True))
    # a layer copied in from a run with another seed is refused even though its hash file matches
    _mixture_file(mix)
    other = tmp_path / "other"
    search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpointing=_ckpt(other), seed=7)
    for suffix in ("", ".sha256"):
        (ckpt / f"layer-0003.rank0.pt{suffix}").write_bytes((other / f"layer-0003.rank0.pt{suffix}").read_bytes())
    with pytest.raises(OptimalStepsError, match=r"layer-0003.rank0.pt was written by another run \(seed: 7"):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpointing=_ckpt(ckpt, resume=True))


def test_checkpoint_is_never_read_without_resume(tmp_path, model, noise):
    ckpt = tmp_path / "ckpt"
    search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt))
    (ckpt / "settings.json").unlink()
    with pytest.raises(OptimalStepsError, match=r"already holds a search checkpoint; .*\(it has layer-0001"):
        search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt), seed=1)
    with pytest.raises(OptimalStepsError, match="storage_dtype: 'float32' in the checkpoint, 'bfloat16' now"):
        search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt, resume=True), storage=Storage(dtype="bfloat16"))


def test_damaged_checkpoint_directories_are_one_line(tmp_path, model, noise):
    ckpt = tmp_path / "ckpt"
    full = search(model, noise, **SEARCH)
    with pytest.raises(KeyboardInterrupt):
        search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt), callback=_crash_after(2))
    (ckpt / "layer-0002.rank0.pt.sha256").write_bytes(os.urandom(64))  # garbage hash: layer 1 is used
    resumed = search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt, resume=True))
    assert resumed.indices == full.indices
    (ckpt / "settings.json").write_text("[1, 2]")
    with pytest.raises(OptimalStepsError, match="must hold a JSON object, got list"):
        search(model, noise, **SEARCH, checkpointing=_ckpt(ckpt, resume=True))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OptimalStepsError, match="is a file, not a directory"):
        search(model, noise, **SEARCH, checkpointing=_ckpt(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OptimalStepsError, match="cannot write checkpoints in"):
            search(model, noise, **SEARCH, checkpointing=_ckpt(locked / "ckpt"))


def test_disk_storage_leaves_no_trajectory_files(tmp_path, model, noise):
    search(model, noise, **SEARCH, storage=Storage(place="disk", dir=str(tmp_path)))
    with pytest.raises(KeyboardInterrupt):
        search(model, noise, **SEARCH, storage=Storage(place="disk", dir=str(tmp_path)), callback=_crash_after(1))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ the CLI
# Most cases run main() in this process (a subprocess costs ~2 s of start-up each); the cases about the
# process itself (tracebacks, kills, two runs at once) use `python -m optimalsteps`.

GMM = ["--model", "gmm:dim=4,components=2"]
FAST = [*GMM, "--steps", "2", "--teacher-steps", "8"]


def _error_lines(stderr):
    """stderr without the progress bars (tqdm draws and clears them with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def user_files(tmp_path):
    """A folder of the user's files: a schedule, noise of every flavour, a text file, a mixture, a model file."""
    good = np.random.default_rng(0).standard_normal((3, 4))
    np.save(tmp_path / "noise.npy", good.astype(np.float32))
    np.save(tmp_path / "big_endian.npy", good.astype(">f8"))
    np.save(tmp_path / "long_double.npy", good.astype(np.longdouble))
    np.save(tmp_path / "complex.npy", good.astype(np.complex64))
    np.savez(tmp_path / "archive.npz", good)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")
    schedule = {"format": "optimalsteps.schedule.v1", "process": "flow", "times": [1.0, 0.5, 0.0]}
    (tmp_path / "schedule.json").write_text(json.dumps(schedule))
    for name, change in (("meta_list", {"metadata": [1, 2]}), ("meta_text", {"metadata": "abc"}),
                         ("scale_zz", {"metadata": {"noise_scale_time": "zz"}}),
                         ("long", {"times": np.linspace(1.0, 0.0, 20_002).tolist()})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**schedule, **change}))
    (tmp_path / "empty_means.json").write_text(json.dumps({"weights": [1.0], "means": [[]], "stds": [1.0]}))
    (tmp_path / "mine.txt").write_text("the user's own file\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").mkdir()  # a folder where compare writes a file
    (tmp_path / "user.py").write_text(
        "import sys\nfrom optimalsteps import GaussianMixture\n"
        "class Quits(GaussianMixture):\n    def __call__(self, x, t, **cond):\n        sys.exit(0)\n"
        "def quits():\n    m = Quits.random(dim=4, components=2)\n    return Quits(m.weights, m.means, m.stds)\n"
        "def raises():\n    raise RuntimeError('boom')\n")
    return tmp_path


def _cli_cases(d):
    """(argv, words the one error line must contain) per hostile case, by cause."""
    return [
        # schedule files and values
        (["sample", *GMM, "--schedule", f"{d}/meta_list.json"], "metadata must be a JSON object, got list"),
        (["sample", *GMM, "--schedule", f"{d}/meta_text.json"], "metadata must be a JSON object, got str"),
        (["sample", *GMM, "--schedule", f"{d}/scale_zz.json"], "'noise_scale_time' must be a number"),
        (["sample", *GMM, "--schedule", str(d)], "is a directory; give a schedule file or name"),
        (["schedule", "karras", "--steps", "5", "--option", "rho=abc"], "karras rho must be a number"),
        (["schedule", "karras", "--steps", "5", "--option", "rho=0"], "rho must be a finite positive number"),
        (["schedule", "shift", "--steps", "5", "--option", "mu=1e6"], "shift mu must be a finite number in"),
        (["schedule", "beta", "--steps", "5", "--option", "a=-1"], "beta a must be a finite positive number"),
        # models
        (["sample", "--model", f"gmm:{d}/empty_means.json"], "at least one dimension"),
        (["sample", "--model", "gmm:dim=1000000000000"], "dimension 1000000000000 needs"),
        (["sample", "--model", f"python:{d}/user.py:raises"], "raised RuntimeError: boom"),
        (["sample", "--model", f"python:{d}/user.py:quits", "--steps", "2"], "the model called sys.exit(0)"),
        # noise files and seeds
        (["sample", *GMM, "--noise", f"{d}/archive.npz"], "not a readable .npy array: it is a .npz archive"),
        (["sample", *GMM, "--noise", f"{d}/text.npy"], "not a readable .npy array: it has no NumPy header"),
        (["sample", *GMM, "--noise", f"{d}/complex.npy"], "real floating-point values, got numpy complex64"),
        (["sample", *GMM, "--noise", f"{d}/noise.npy", "--samples", "5"], "--samples 5 disagrees with --noise"),
        (["sample", *GMM, "--seed", str(2**70)], "--seed must be a whole number in [0, 2**63)"),
        # bounds
        (["sample", *GMM, "--steps", "1000000000"], "--steps 1000000000 is more than 10000"),
        (["sample", *GMM, "--schedule", f"{d}/long.json"], "step count 20001 is more than 10000"),
        (["sample", *GMM, "--samples", str(10**12)], "samples is more than 1000000; pass --allow-huge"),
        (["sample", *GMM, "--samples", str(10**12), "--allow-huge"], "GiB of memory is available"),
        (["search", *FAST, "--teacher-steps", "50000", "--out", f"{d}/s.json"], "--teacher-steps 50000 is more"),
        # outputs, before any work
        (["search", *FAST, "--out", f"{d}/report", "--force"], "is a directory; give a file name"),
        (["search", *FAST, "--out", f"{d}/mine.txt/s.json"], "mine.txt is a file, not a directory"),
        (["search", *FAST, "--out", f"{d}/s.json", "--checkpoint", f"{d}/mine.txt"], "is a file, not a folder"),
        (["search", *FAST, "--out", f"{d}/s.json", "--checkpoint", f"{d}/s.json"], "name the same path"),
        (["compare", *FAST, "--out", f"{d}/mine.txt"], "is a file, not a folder"),
        (["compare", *FAST, "--out", f"{d}/report", "--force"], "holds a folder results.json"),
        (["demo", "--out", f"{d}/mine.txt"], "is a file, not a folder"),
        (["demo", "--teacher-steps", "20000", "--out", f"{d}/demo"], "--teacher-steps 20000 is more than 10000"),
        (["sample", *GMM, "--out", ""], "--out is empty"),
        (["sample", *GMM, "--noise", f"{d}/noise.npy", "--out", f"{d}/noise.npy", "--force"], "name the same path"),
        (["schedule", "karras", "--steps", "5", "--out", f"{d}/mine.txt"], "already exists"),
        # options that do not apply
        (["demo", "--quick", "--steps", "7", "--out", f"{d}/demo"], "--quick sets its own --steps"),
        (["search", *FAST, "--out", f"{d}/s.json", "--prompt", "a cat"], "--prompt applies only to --model diffusers"),
        (["compare", *FAST, "--out", f"{d}/c", "--height", "64"], "--height applies only to --model diffusers"),
        (["search", *FAST, "--out", f"{d}/s.json", "--storage-dir", f"{d}/st"], "--storage-dir applies only to"),
    ]


def test_cli_refuses_hostile_input_in_one_line(user_files, capsys):
    from optimalsteps.cli import main

    before = _snapshot(user_files)
    for argv, words in _cli_cases(user_files):
        code = main(argv)
        err = _error_lines(capsys.readouterr().err)
        assert code == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("optimalsteps: error: ") and words in err[0], (argv, err)
        assert _snapshot(user_files) == before, argv  # nothing written, nothing left behind


def test_cli_reads_any_float_noise_file(user_files, capsys):
    from optimalsteps.cli import main

    outputs = []
    for name in ("noise", "big_endian", "long_double"):
        out = user_files / f"out-{name}.npy"
        assert main(["sample", *GMM, "--steps", "3", "--noise", str(user_files / f"{name}.npy"), "--out", str(out)]) == 0
        outputs.append(np.load(out))
    for other in outputs[1:]:  # the same noise in three encodings: the same samples
        np.testing.assert_array_equal(other, outputs[0])


def test_force_starts_a_checkpointed_search_over(tmp_path, capsys):
    from optimalsteps.cli import main

    ckpt = tmp_path / "ckpt"
    argv = ["search", *FAST, "--checkpoint", str(ckpt)]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "b.json")]) == 2
    assert "already holds a search checkpoint; pass --resume" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "b.json"), "--force"]) == 0
    assert json.loads((ckpt / "settings.json").read_text())["seed"] == 1


def _cli(*argv, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "optimalsteps", *argv], capture_output=True, text=True, env=env,
                          **kwargs)


def test_unexpected_errors_are_one_line_with_traceback_only_on_debug(tmp_path):
    # a model that fails during the run with an error of its own goes through the last-resort handler
    (tmp_path / "user.py").write_text(
        "from optimalsteps import GaussianMixture\n"
        "class Broken(GaussianMixture):\n"
        "    def __call__(self, x, t, **cond):\n        return {}['missing']\n"
        "def broken():\n    m = GaussianMixture.random(dim=4, components=2)\n"
        "    return Broken(m.weights, m.means, m.stds)\n")
    argv = ["sample", "--model", f"python:{tmp_path / 'user.py'}:broken", "--steps", "2",
            "--out", str(tmp_path / "x.npy")]
    quiet = _cli(*argv)
    lines = _error_lines(quiet.stderr)
    assert quiet.returncode == 2 and len(lines) == 1, quiet.stderr
    assert "unexpected KeyError: 'missing' (rerun with --debug for the traceback)" in lines[0]
    loud = _cli(*argv, "--debug")
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert _error_lines(loud.stderr)[-1] == lines[0]
    env = _cli(*argv, env_extra={"OPTIMALSTEPS_DEBUG": "1"})
    assert env.returncode == 2 and "Traceback (most recent call last)" in env.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.py"]  # no output, no temporary file


def _wait_for(path, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def test_killed_search_refuses_to_resume_on_an_edited_model_file(tmp_path):
    mix = _mixture_file(tmp_path / "mix.json")
    ckpt = tmp_path / "ckpt"
    argv = ["search", "--model", f"gmm:{mix}", "--samples", "6", "--steps", "6", "--teacher-steps", "120",
            "--checkpoint", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "optimalsteps", *argv, "--out", str(tmp_path / "a.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_for(ckpt / "teacher.rank0.pt.sha256", first)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL  # killed mid-run, after the teacher's checkpoint
    _mixture_file(mix, shift=1e-3)  # the user edits the model file between the runs
    edited = _cli(*argv, "--resume", "--out", str(tmp_path / "b.json"))
    assert edited.returncode == 2 and "model_fingerprint" in edited.stderr and "Traceback" not in edited.stderr
    assert not (tmp_path / "b.json").exists()
    _mixture_file(mix)  # put back: the resumed search is the uninterrupted one
    resumed = _cli(*argv, "--resume", "--out", str(tmp_path / "b.json"))
    assert resumed.returncode == 0, resumed.stderr
    model = load_model(f"gmm:{mix}")
    straight = search(model, draw_noise(model, 6, 0), steps=6, teacher_steps=120, method="dp")
    assert json.loads((tmp_path / "b.json").read_text())["metadata"]["teacher_indices"] == straight.indices


def test_two_searches_cannot_share_a_checkpoint_directory(tmp_path):
    (tmp_path / "slow").write_text("")
    (tmp_path / "user.py").write_text(
        "import os, time\nfrom optimalsteps import GaussianMixture\n"
        "class Slow(GaussianMixture):\n"
        "    def __call__(self, x, t, **cond):\n"
        f"        if os.path.exists({str(tmp_path / 'slow')!r}):\n            time.sleep(0.2)\n"
        "        return super().__call__(x, t, **cond)\n"
        "def slow():\n    m = GaussianMixture.random(dim=4, components=2, seed=3)\n"
        "    return Slow(m.weights, m.means, m.stds)\n")
    ckpt = tmp_path / "ckpt"
    argv = ["search", "--model", f"python:{tmp_path / 'user.py'}:slow", "--samples", "4", "--steps", "3",
            "--teacher-steps", "60", "--checkpoint", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "optimalsteps", *argv, "--out", str(tmp_path / "a.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(ckpt / "settings.json", first)
        assert first.poll() is None, "the first search ended before the second started"
        second = _cli(*argv, "--resume", "--out", str(tmp_path / "b.json"))
        assert first.poll() is None, "the first search ended before the second was refused"
        assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr, second.stderr
        assert not (tmp_path / "b.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (tmp_path / "slow").unlink()
    # the killed run's lock died with it: the directory resumes at once
    third = _cli(*argv, "--resume", "--out", str(tmp_path / "c.json"))
    assert third.returncode == 0, third.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
