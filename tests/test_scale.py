"""Data-parallel search on gloo, bounded-memory storage, checkpoint and resume."""

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimalsteps import GaussianMixture, OptimalStepsError
from optimalsteps import search as any_search
from optimalsteps.optimize.options import Checkpointing, CostView, DPOptions, Storage

SEARCH = dict(steps=4, teacher_steps=24)
EPS32 = torch.finfo(torch.float32).eps


def _float32_tolerance(error: float, scale: float, factor: float = 64.0) -> float:
    """Absolute tolerance on a mean squared error of float32 states that may round differently (model calls
    batched differently): states moved by `factor` float32 roundings of their magnitude `scale` move
    mean((a - b)^2) by about 2 sqrt(error) times that."""
    step = factor * EPS32 * scale
    return 2.0 * (error ** 0.5) * step + step * step + factor * EPS32 * error

# these tests check the paper's plain DP: they call it by name
search = functools.partial(any_search, method="dp")


def _model_noise(process="flow", samples=7, dim=12):
    model = GaussianMixture.random(dim=dim, components=4, seed=2, process=process)
    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(5))
    return model, noise


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, options, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, noise = _model_noise()
        result = search(model, noise, **SEARCH, **options)
        queue.put((rank, result.indices, result.per_sample_indices, result.nfe, result.dp_cost))
    finally:
        dist.destroy_process_group()


def _run_ranks(world, options):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, options, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", [dict(dp=DPOptions(aggregate="joint")), dict(dp=DPOptions(aggregate="median")),
                                     dict(solver="dpmpp2m", dp=DPOptions(aggregate="joint", cost="x0")),
                                     dict(solver="dpmpp2m", dp=DPOptions(aggregate="median", objective="log"))])
def test_gloo_ranks_give_the_single_process_schedule(world, options):
    model, noise = _model_noise()
    single = search(model, noise, **SEARCH, **options)
    ranks = _run_ranks(world, options)
    for _, indices, per_sample, nfe, cost in ranks:
        assert indices == single.indices
        assert nfe == single.nfe
        # float32 model calls batched differently round differently: equal to float32 precision
        scale = float(single.teacher_samples.abs().max())
        assert cost == pytest.approx(single.dp_cost, abs=_float32_tolerance(single.dp_cost, scale))
        if options["dp"].aggregate == "median":
            assert per_sample == single.per_sample_indices


class _Crash(Exception):
    pass


def _crash_after(layer):
    def callback(stage, done, total):
        if stage == "layer" and done == layer:
            raise _Crash()
    return callback


@pytest.mark.parametrize("options", [dict(), dict(solver="dpmpp2m", dp=DPOptions(aggregate="median")),
                                     dict(dp=DPOptions(cost="x0")), dict(dp=DPOptions(reference_compat=True))])
def test_killed_search_resumes_to_the_same_schedule(tmp_path, options):
    model, noise = _model_noise()
    full = search(model, noise, **SEARCH, **options)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        search(model, noise, **SEARCH, **options, checkpointing=Checkpointing(str(ckpt)), callback=_crash_after(2))
    layers_run = []
    resumed = search(model, noise, **SEARCH, **options, checkpointing=Checkpointing(str(ckpt), resume=True),
                     callback=lambda stage, done, total: layers_run.append((stage, done)))
    assert resumed.indices == full.indices and resumed.dp_cost == pytest.approx(full.dp_cost)
    assert resumed.nfe == full.nfe
    assert ("layer", 1) not in layers_run and ("layer", 3) in layers_run  # layers 1-2 were not redone


def test_truncated_checkpoint_falls_back_to_the_previous_layer(tmp_path):
    model, noise = _model_noise()
    full = search(model, noise, **SEARCH)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        search(model, noise, **SEARCH, checkpointing=Checkpointing(str(ckpt)), callback=_crash_after(3))
    layer3 = ckpt / "layer-0003.rank0.pt"
    layer3.write_bytes(layer3.read_bytes()[:100])  # a crash mid-write
    layers_run = []
    resumed = search(model, noise, **SEARCH, checkpointing=Checkpointing(str(ckpt), resume=True),
                     callback=lambda stage, done, total: layers_run.append(done))
    assert resumed.indices == full.indices
    assert 3 in layers_run and 2 not in layers_run[1:]  # redone from layer 3 on


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    model, noise = _model_noise()
    ckpt = tmp_path / "ckpt"
    search(model, noise, **SEARCH, checkpointing=Checkpointing(str(ckpt)), seed=1)
    with pytest.raises(OptimalStepsError, match="already holds a search checkpoint; pass --resume"):
        search(model, noise, **SEARCH, checkpointing=Checkpointing(str(ckpt)), seed=1)
    with pytest.raises(OptimalStepsError, match=r"other settings \(steps: 4 in the checkpoint, 3 now"):
        search(model, noise, steps=3, teacher_steps=24, checkpointing=Checkpointing(str(ckpt), resume=True), seed=1)
    with pytest.raises(OptimalStepsError, match="seed: 1 in the checkpoint, 2 now"):
        search(model, noise, **SEARCH, checkpointing=Checkpointing(str(ckpt), resume=True), seed=2)
    other_noise = torch.randn(7, 12)
    with pytest.raises(OptimalStepsError, match="noise:"):
        search(model, other_noise, **SEARCH, checkpointing=Checkpointing(str(ckpt), resume=True), seed=1)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_offloaded_trajectory_gives_the_in_memory_schedule(tmp_path, storage):
    model, noise = _model_noise("vp")
    base = search(model, noise, **SEARCH, solver="dpmpp2m")
    off = search(model, noise, **SEARCH, solver="dpmpp2m",
                 storage=Storage(storage, dir=str(tmp_path), target_chunk=5))
    assert off.indices == base.indices and off.dp_cost == pytest.approx(base.dp_cost, rel=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_trajectory_is_close(dtype):
    """Teacher states rounded to 8 (bf16) or 11 (fp16) bits move each cost by a relative ~2^-8: the
    schedule is the same here, and its realised cost within that rounding of the float32 search."""
    model, noise = _model_noise("flow", samples=6, dim=32)
    base = search(model, noise, **SEARCH)
    half = search(model, noise, **SEARCH, storage=Storage(dtype=dtype))
    assert half.indices == base.indices
    assert half.dp_cost == pytest.approx(base.dp_cost, rel=2e-2)


def test_memory_estimate_refuses_what_cannot_fit():
    model, noise = _model_noise()
    with pytest.raises(OptimalStepsError, match=r"needs about .* but 1\.0 KiB is the limit; use --storage"):
        search(model, noise, **SEARCH, storage=Storage(memory_limit=1024))
    with pytest.raises(OptimalStepsError, match="unknown storage 'tape'"):
        search(model, noise, **SEARCH, storage=Storage("tape"))
    with pytest.raises(OptimalStepsError, match="unknown storage dtype"):
        search(model, noise, **SEARCH, storage=Storage(dtype="int8"))


def test_cost_subset_of_channels_and_frames():
    class Video:
        process, prediction, sample_shape = "flow", "x0", (4, 3, 2, 2)

        def __init__(self):
            self.inner = GaussianMixture.random(dim=48, components=3, seed=0)

        def __call__(self, x, t):
            return self.inner(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    model = Video()
    noise = torch.randn(3, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    result = search(model, noise, steps=3, teacher_steps=16,
                    dp=DPOptions(view=CostView(channels=[0, 2], frames=[1])))
    from optimalsteps import sample
    out = sample(model, noise, result.schedule).samples
    # the DP's cost is float64 arithmetic on float32 states: the realised error in the same precision
    sub = (out.double() - result.teacher_samples.double())[:, [0, 2]][:, :, [1]]
    tolerance = _float32_tolerance(result.dp_cost, float(out.abs().max()))
    assert float(sub.pow(2).mean()) == pytest.approx(result.dp_cost, abs=tolerance)
    assert result.error == pytest.approx(float(sub.pow(2).mean()), rel=1e-12)  # the same, in the cost view


def test_cli_under_torchrun_writes_once_and_matches_single_process(tmp_path):
    import json
    import subprocess
    import sys

    common = ["search", "--model", "gmm:dim=8,components=3,seed=1", "--steps", "3", "--teacher-steps", "16",
              "--samples", "5", "--aggregate", "median"]
    single = tmp_path / "single.json"
    assert subprocess.run([sys.executable, "-m", "optimalsteps", *common, "--out", str(single)],
                          capture_output=True).returncode == 0
    multi = tmp_path / "multi.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "optimalsteps", *common, "--out", str(multi)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert a["times"] == b["times"] and b["metadata"]["ranks"] == 2
