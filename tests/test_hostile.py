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

ROOT = Path(__file__).resolve().parents[1]
SEARCH = dict(steps=3, teacher_steps=12)


@pytest.fixture(scope="module")
def model():
    return GaussianMixture.random(dim=6, components=3, seed=1)


@pytest.fixture(scope="module")
def noise(model):
    return draw_noise(model, 4, 0)


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
    (lambda m, n: search(m, n, **SEARCH, teacher_schedule="uniform"), "teacher_schedule must be a Schedule"),
    (lambda m, n: search(m, n, **SEARCH, max_batch=0), "max_batch must be at least 1, got 0"),
    (lambda m, n: search(m, n, **SEARCH, cost_channels=[99]), r"cost_channels \[99\] out of range"),
    (lambda m, n: search(m, n, **SEARCH, cost_frames=[0]), "cost_frames needs 4-d samples"),
    (lambda m, n: search(m, n, **SEARCH, storage_dtype=torch.int8), "storage dtype must be one of"),
    (lambda m, n: search(m, n, **SEARCH, target_chunk=0), "target_chunk must be at least 1"),
    (lambda m, n: search(m, n, **SEARCH, refine=True, refine_budget=-5), "refine_budget must be at least 0"),
    (lambda m, n: search(m, n, **SEARCH, memory_limit="1GB"), "memory_limit .* must be a whole number, got '1GB'"),
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


def test_resume_refuses_a_changed_model_and_foreign_files(tmp_path, noise):
    mix = _mixture_file(tmp_path / "mix.json")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpoint_dir=str(ckpt), callback=_crash_after(2))
    _mixture_file(mix, shift=1e-3)  # edited between the runs
    with pytest.raises(OptimalStepsError, match="model_fingerprint: '[0-9a-f]+' in the checkpoint"):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpoint_dir=str(ckpt), resume=True)
    # a layer copied in from a run with another seed is refused even though its hash file matches
    _mixture_file(mix)
    other = tmp_path / "other"
    search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpoint_dir=str(other), seed=7)
    for suffix in ("", ".sha256"):
        (ckpt / f"layer-0003.rank0.pt{suffix}").write_bytes((other / f"layer-0003.rank0.pt{suffix}").read_bytes())
    with pytest.raises(OptimalStepsError, match=r"layer-0003.rank0.pt was written by another run \(seed: 7"):
        search(load_model(f"gmm:{mix}"), noise, **SEARCH, checkpoint_dir=str(ckpt), resume=True)


def test_checkpoint_is_never_read_without_resume(tmp_path, model, noise):
    ckpt = tmp_path / "ckpt"
    search(model, noise, **SEARCH, checkpoint_dir=str(ckpt))
    (ckpt / "settings.json").unlink()
    with pytest.raises(OptimalStepsError, match=r"already holds a search checkpoint; .*\(it has layer-0001"):
        search(model, noise, **SEARCH, checkpoint_dir=str(ckpt), seed=1)
    with pytest.raises(OptimalStepsError, match="storage_dtype: 'float32' in the checkpoint, 'bfloat16' now"):
        search(model, noise, **SEARCH, checkpoint_dir=str(ckpt), resume=True, storage_dtype="bfloat16")


def test_damaged_checkpoint_directories_are_one_line(tmp_path, model, noise):
    ckpt = tmp_path / "ckpt"
    full = search(model, noise, **SEARCH)
    with pytest.raises(KeyboardInterrupt):
        search(model, noise, **SEARCH, checkpoint_dir=str(ckpt), callback=_crash_after(2))
    (ckpt / "layer-0002.rank0.pt.sha256").write_bytes(os.urandom(64))  # garbage hash: layer 1 is used
    resumed = search(model, noise, **SEARCH, checkpoint_dir=str(ckpt), resume=True)
    assert resumed.indices == full.indices
    (ckpt / "settings.json").write_text("[1, 2]")
    with pytest.raises(OptimalStepsError, match="must hold a JSON object, got list"):
        search(model, noise, **SEARCH, checkpoint_dir=str(ckpt), resume=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OptimalStepsError, match="is a file, not a directory"):
        search(model, noise, **SEARCH, checkpoint_dir=str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OptimalStepsError, match="cannot write checkpoints in"):
            search(model, noise, **SEARCH, checkpoint_dir=str(locked / "ckpt"))


def test_disk_storage_leaves_no_trajectory_files(tmp_path, model, noise):
    search(model, noise, **SEARCH, storage="disk", storage_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        search(model, noise, **SEARCH, storage="disk", storage_dir=str(tmp_path), callback=_crash_after(1))
    assert list(tmp_path.iterdir()) == []
