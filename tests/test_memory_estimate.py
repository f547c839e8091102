"""The peak-memory estimates of the validated search and the beam DP against the bytes of tensor storage the
search really holds at once (counted op by op, no timing)."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from optimalsteps import GaussianMixture, search
from optimalsteps.cli import main
from optimalsteps.optimize import beam
from optimalsteps.optimize.memory import estimate_beam_bytes
from optimalsteps.optimize.options import DPOptions, Storage
from optimalsteps.optimize.search import estimated_method, memory_estimate
from optimalsteps.optimize.select import DATA_SAMPLES


class LiveStorage(TorchDispatchMode):
    """The peak bytes of tensor storage made by the ops run under it and alive at once; a view of a tensor
    counts with its storage, a view of a tensor made before is not counted."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.current, self.peak = {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in inputs:
                    continue
                self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.current += self.size[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.size.pop(key)
            del self.refs[key]


def test_the_counter_counts_storage_once_and_frees_it():
    with LiveStorage() as live:
        a = torch.zeros(1000, dtype=torch.float64)
        view = a[:10]
        b = a + 1
        del a
        assert live.current == 16000  # the view keeps a's storage
        del view
        assert live.current == 8000 and live.peak == 16000
        del b


# within this much above the measured peak: the estimate counts every large tensor the search holds, a little
# bookkeeping rounded up; the model's own activations (a mixture's: a few vectors per state) are not in it
SLACK = 1.10


def _case(dim, samples, dtype):
    model = GaussianMixture.random(dim=dim, components=2, seed=0, process="flow")
    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    return model, noise


@pytest.mark.parametrize("solver,dtype,dim,samples,teacher_steps,steps", [
    ("euler", torch.float64, 16, 4, 24, 4),
    ("dpmpp2m", torch.float32, 64, 8, 40, 5),
    ("heun", torch.float32, 64, 8, 40, 5),
    ("unipc", torch.float32, 64, 8, 40, 5),
])
def test_validated_search_estimate_bounds_the_measured_peak(solver, dtype, dim, samples, teacher_steps, steps):
    model, noise = _case(dim, samples, dtype)
    estimate = memory_estimate(noise, teacher_steps, solver, steps=steps, model=model)
    assert estimated_method(noise, DPOptions(), Storage(), solver) == "validated"
    with LiveStorage() as live:
        result = search(model, noise, steps=steps, teacher_steps=teacher_steps, solver=solver, seed=0)
    assert result.schedule.metadata["selection_method"] == "validated"
    # the data guard's true samples (float64, two copies) are on the host; on the CPU they share the pool with the
    # search's tensors, so the measured peak is bounded by the sum, and the device part alone is tight
    assert estimate["disk"] == 0 and estimate["host"] == 2 * DATA_SAMPLES * dim * 8
    assert live.peak <= estimate["device"] + estimate["host"], (live.peak, estimate)
    assert estimate["device"] <= SLACK * live.peak, (live.peak, estimate)


@pytest.mark.parametrize("block", [beam.BLOCK_ELEMENTS, 3000])
def test_beam_dp_estimate_bounds_the_measured_peak_also_in_blocks(monkeypatch, block):
    monkeypatch.setattr(beam, "BLOCK_ELEMENTS", block)  # small blocks: the candidate states of a few entries at once
    model, noise = _case(32, 4, torch.float32)
    dp = DPOptions(objective="log", width=3)
    estimate = memory_estimate(noise, 30, "dpmpp2m", dp, steps=4, method="dp")
    assert estimated_method(noise, dp, Storage(), "dpmpp2m", "dp") == "beam"
    with LiveStorage() as live:
        search(model, noise, steps=4, teacher_steps=30, solver="dpmpp2m", dp=dp, method="dp")
    assert live.peak <= estimate["device"] <= SLACK * live.peak, (live.peak, estimate["device"])


def test_beam_estimate_grows_with_the_width_and_is_bounded_by_blocks():
    sizes = dict(samples=8, sample_numel=256, points=201, steps=10, multistep=True, state_dtype=torch.float32)
    one, four = (estimate_beam_bytes(width=w, block_elements=beam.BLOCK_ELEMENTS, **sizes) for w in (1, 4))
    assert four > one
    # at least one entry's candidate states per block: 191 targets of 8 * 256 elements, 28 bytes each to score
    tiny = estimate_beam_bytes(width=1, block_elements=1, **sizes)
    assert tiny >= 191 * 8 * 256 * 28 and tiny < one


def test_the_plain_dp_keeps_its_estimate_and_the_cli_names_the_method(tmp_path, capsys):
    _, noise = _case(16, 4, torch.float32)
    assert estimated_method(noise, DPOptions(), Storage(), "euler", "dp") == "dp"
    assert estimated_method(noise, DPOptions(cost="x0"), Storage(), "euler") == "dp"  # a plain-DP-only option
    assert estimated_method(noise, DPOptions(aggregate="median", objective="log"), Storage(), "euler") == "dp"
    assert memory_estimate(noise, 24, "euler", method="validated", steps=4) != memory_estimate(
        noise, 24, "euler", method="dp", steps=4)
    base = ["search", "--model", "gmm:dim=4,components=2", "--samples", "3", "--steps", "3", "--teacher-steps", "12"]
    for extra, label in (([], "validated search"), (["--method", "dp"], "plain DP"),
                         (["--method", "dp", "--beam-width", "2"], "beam DP"), (["--refine"], "plain DP")):
        assert main(base + extra + ["--out", str(tmp_path / f"{len(extra)}.json")]) == 0
        assert f"peak memory estimate ({label}): device" in capsys.readouterr().out
