"""Search speed: `optimalsteps.optimize.search` against plain implementations written here.

- "plain Algorithm 1": the paper's algorithm as written, one sample at a time, one batched model call per
  layer, every candidate state of every (source, target) pair materialised, exactly-M-step cells (the
  semantics of `search(..., dp=DPOptions(aggregate="median"))`, whose per-sample schedules must be identical).
- "released loop": the released code's batched loop structure (one batched model call per layer, then
  a Python loop over sources and targets with "at most k steps" cells and noise placed at any grid
  point), the semantics of `search(..., dp=DPOptions(reference_compat=True))`.

Each variant runs in its own process so that its peak resident memory can be read (ru_maxrss, minus the
process's size before the search). Run: python benchmarks/search_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from optimalsteps import GaussianMixture, search
from optimalsteps.core.models import predict_x0
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.options import DPOptions
from optimalsteps.optimize.teacher import run_teacher
from optimalsteps.core.solvers import update_coefficients


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _euler_jumps(process, x, x0, t, targets):
    """Euler (DDIM) states from (x, t) to every target time: [J, D]."""
    c_x, c_x0, _ = update_coefficients("euler", process, t.expand(len(targets)), targets)
    return c_x[:, None].float() * x[None] + c_x0[:, None].float() * x0[None]


def plain_algorithm1(model, noise, teacher, steps):
    """Per-sample DP, all candidate states materialised; returns per-sample index lists and NFE."""
    times = teacher.times
    n = len(times) - 1
    run = run_teacher(model, noise, teacher, "euler")
    nfe = run.nfe * noise.shape[0]
    schedules = []
    for b in range(noise.shape[0]):
        target_states = run.states[b]
        z = torch.zeros_like(target_states)
        z[0] = target_states[0]
        valid = torch.zeros(n + 1, dtype=torch.bool)
        valid[0] = True
        trace = torch.full((steps + 1, n + 1), -1, dtype=torch.long)
        for k in range(1, steps + 1):
            src = torch.arange(k - 1, n - steps + k)
            src = src[valid[src]]
            x0 = predict_x0(model, z[src], times[src])
            nfe += len(src)
            candidates = torch.full((len(src), n + 1) + z.shape[1:], float("inf"))
            for s, i in enumerate(src.tolist()):
                candidates[s, i + 1:] = _euler_jumps(model.process, z[i], x0[s], times[i], times[i + 1:])
            cost = torch.stack([(c.double() - target_states.double()).pow(2).mean(-1) for c in candidates])
            lo, hi = k, (n - steps + k if k < steps else n)
            allowed = torch.zeros(n + 1, dtype=torch.bool)
            allowed[lo:hi + 1] = True
            if k == steps:
                allowed[:n] = False
            cost[:, ~allowed] = float("inf")
            best = cost.argmin(0)
            new_z = torch.zeros_like(z)
            new_valid = torch.isfinite(cost.min(0).values)
            for j in new_valid.nonzero().squeeze(1).tolist():
                new_z[j] = candidates[best[j], j]
                trace[k, j] = src[best[j]]
            z, valid = new_z, new_valid
            del candidates
        path = [n]
        for k in range(steps, 0, -1):
            path.append(int(trace[k, path[-1]]))
        schedules.append(path[::-1])
    return schedules, nfe


def released_loop(model, noise, teacher, steps):
    """The released code's per-sample loop structure ("at most k" cells, noise at any grid point)."""
    times = teacher.times
    n = len(times) - 1
    run = run_teacher(model, noise, teacher, "euler")
    nfe = run.nfe * noise.shape[0]
    schedules = []
    for b in range(noise.shape[0]):
        target_states = run.states[b]
        start = target_states[0]
        z_prev = start.expand(n + 1, *start.shape).clone()
        best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
        trace = torch.zeros((steps + 1, n + 1), dtype=torch.long)
        for k in range(1, steps + 1):
            x0 = predict_x0(model, z_prev[:n], times[:n])
            nfe += n
            z_next = z_prev.clone()
            for i in range(n):
                jumps = _euler_jumps(model.process, z_prev[i], x0[i], times[i], times[i + 1:])
                for offset, j in enumerate(range(i + 1, n + 1)):
                    cost = float((jumps[offset].double() - target_states[j].double()).pow(2).mean())
                    if cost < best[j]:
                        best[j] = cost
                        trace[k:, j] = i
                        z_next[j] = jumps[offset]
            z_prev = z_next
        path = [n]
        for k in range(steps, 0, -1):
            path.append(int(trace[k, path[-1]]))
        schedules.append(path[::-1])
    return schedules, nfe


def _worker(variant, dim, teacher_steps, steps, samples, queue):
    torch.set_num_threads(2)
    model = GaussianMixture.random(dim=dim, components=8, seed=0, process="flow")
    noise = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))[:samples]
    teacher = default_teacher_grid(model.process, teacher_steps)
    base = _rss_mb()
    started = time.perf_counter()
    if variant == "search (exact, per sample)":
        r = search(model, noise, steps=steps, teacher_grid=teacher, dp=DPOptions(aggregate="median"), method="dp")
        schedules, nfe = r.per_sample_indices, r.nfe
    elif variant == "search (joint)":
        r = search(model, noise, steps=steps, teacher_grid=teacher, dp=DPOptions(aggregate="joint"), method="dp")
        schedules, nfe = [r.indices], r.nfe
    elif variant == "search (reference-compat)":
        r = search(model, noise, steps=steps, teacher_grid=teacher, dp=DPOptions(reference_compat=True))
        schedules, nfe = r.per_sample_indices, r.nfe
    elif variant == "plain Algorithm 1":
        schedules, nfe = plain_algorithm1(model, noise, teacher, steps)
    else:
        schedules, nfe = released_loop(model, noise, teacher, steps)
    seconds = time.perf_counter() - started
    queue.put((schedules, nfe, seconds, max(0.0, _rss_mb() - base)))


def run_variant(variant, dim, teacher_steps, steps, samples):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(variant, dim, teacher_steps, steps, samples, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--plain-samples", type=int, default=2,
                        help="for D >= 1024 the plain per-sample loops run on this many of the 8 samples and "
                             "their time is scaled to 8 (they cost the same per sample)")
    args = parser.parse_args()
    dims = [16, 64] if args.quick else [64, 1024, 4096]
    teacher_steps, steps, samples = (40, 5, 2) if args.quick else (200, 10, 8)
    print(f"mixture (flow, 8 components), N = {teacher_steps}, M = {steps}, B = {samples}, torch threads = 2")
    print()
    print("| D | variant | seconds | NFE | peak extra memory (MB) | speed-up | same schedules |")
    print("|---|---|---|---|---|---|---|")
    pairs = [("search (exact, per sample)", "plain Algorithm 1"), ("search (reference-compat)", "released loop")]
    for dim in dims:
        plain_samples = samples if dim < 1024 or args.quick else min(samples, args.plain_samples)
        scale = samples / plain_samples
        for ours, plain in pairs:
            a = run_variant(ours, dim, teacher_steps, steps, samples)
            b = run_variant(plain, dim, teacher_steps, steps, plain_samples)
            same = a[0][:plain_samples] == b[0][:plain_samples]
            note = f" (run on {plain_samples} samples, time x{scale:g})" if scale != 1 else ""
            seconds = b[2] * scale
            print(f"| {dim} | {plain}{note} | {seconds:.2f} | {int(b[1] * scale)} | {b[3]:.0f} | 1.0 | |")
            print(f"| {dim} | {ours} | {a[2]:.2f} | {a[1]} | {a[3]:.0f} | {seconds / a[2]:.1f}x | {same} |",
                  flush=True)
        j = run_variant("search (joint)", dim, teacher_steps, steps, samples)
        print(f"| {dim} | search (joint, one schedule for the batch) | {j[2]:.2f} | {j[1]} | {j[3]:.0f} | | |")


if __name__ == "__main__":
    main()
