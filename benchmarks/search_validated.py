"""The beam DP's gap to the optimum and the validated search's cost, on Gaussian mixtures.

1. Gap: on small teacher grids (N = 12, M = 4) every schedule is enumerated (the beam at a width no cell can
   exceed); the widths 1 (the plain DP) and 4 (the default beam candidate) are scored against that optimum,
   per process, solver and objective, with their model calls and peak memory (sample vectors held).
2. Budget: the model calls of the default validated search against the plain DP on the same settings (16
   search samples, 200 teacher steps), per solver and step count, and which candidate won.

Run: nice -n 10 python benchmarks/search_validated.py [--quick] [--solvers unipc ...] [--gap-grid N M] [--gap-widths 1 4 ...]
     [--gap-only]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from optimalsteps import GaussianMixture, search
from optimalsteps.optimize.beam import beam_dp
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.teacher import run_teacher

SOLVERS = ("euler", "heun", "dpmpp2m", "unipc")


def gap_table(seeds: list[int], n: int, m: int, samples: int, dim: int, solvers: list[str],
              widths: tuple[int, ...] = (1, 4)) -> str:
    exhaustive = math.comb(n - 1, m - 1)
    widest = widths[-1]
    ws = " / ".join(f"w{w}" for w in widths)
    lines = [f"| process | solver | objective | " + " | ".join(f"width {w} gap" for w in widths) +
             f" | width {widest} = optimum | NFE/sample {ws} / all ({exhaustive}) | peak vectors {ws} / all |",
             "|---|---|---|" + "---:|" * (len(widths) + 1) + "---|---|"]
    for process in ("flow", "vp", "ve"):
        for solver in solvers:
            for objective in ("mse", "log"):
                gaps = {w: [] for w in widths}
                calls = {w: 0 for w in (*widths, exhaustive)}
                peak = {w: 0 for w in (*widths, exhaustive)}
                for seed in seeds:
                    model = GaussianMixture.random(dim=dim, components=8, seed=200 + seed, process=process)
                    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                    teacher = default_teacher_grid(model.process, n)
                    run = run_teacher(model, noise, teacher, solver)
                    # the widths re-rank Heun's predictor as the search does (4 per kept state); all: every one
                    results = {w: beam_dp(model, run.states, teacher.times, m, solver, objective, w,
                                          candidates=exhaustive if w == exhaustive else 4)
                               for w in (*widths, exhaustive)}
                    best = results[exhaustive].score
                    for w in widths:
                        # mse: relative excess; log: the excess in dB of mean PSNR (10 log10 e per unit)
                        gaps[w].append(results[w].score / best - 1 if objective == "mse"
                                       else (results[w].score - best) * 10 / math.log(10))
                    for w, r in results.items():
                        calls[w] += r.nfe / samples / len(seeds)
                        peak[w] = max(peak[w], r.peak_vectors)
                unit = "" if objective == "mse" else " dB"
                mean = {w: sum(g) / len(g) for w, g in gaps.items()}
                hits = sum(g <= 1e-12 for g in gaps[widest])
                fmt = (lambda v: f"{100 * v:.1f} %") if objective == "mse" else (lambda v: f"{v:.2f}{unit}")
                lines.append(f"| {process} | {solver} | {objective} | " + " | ".join(fmt(mean[w]) for w in widths) +
                             f" | {hits} of {len(seeds)} | " + " / ".join(f"{calls[w]:.0f}" for w in calls) +
                             " | " + " / ".join(str(peak[w]) for w in peak) + " |")
    return "\n".join(lines)


def budget_table(steps: list[int], samples: int, teacher_steps: int, dim: int, solvers: list[str]) -> str:
    lines = ["| process | solver | M | plain DP NFE | validated NFE | ratio | validation samples | candidates | winner "
             "| seconds plain / validated |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for process in ("flow", "vp", "ve"):
        model = GaussianMixture.random(dim=dim, components=8, seed=300, process=process)
        noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(0))
        for solver in solvers:
            for m in steps:
                started = time.perf_counter()
                plain = search(model, noise, m, teacher_steps=teacher_steps, solver=solver, method="dp")
                middle = time.perf_counter()
                chosen = search(model, noise, m, teacher_steps=teacher_steps, solver=solver)
                done = time.perf_counter()
                meta = chosen.schedule.metadata
                lines.append(f"| {process} | {solver} | {m} | {plain.nfe} | {chosen.nfe} | {chosen.nfe / plain.nfe:.2f} "
                             f"| {meta['validation_samples']} | {len(meta['selection'])} | {meta['winner']} "
                             f"| {middle - started:.1f} / {done - middle:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument("--gap-grid", nargs=2, type=int, default=(12, 4), metavar=("N", "M"),
                   help="teacher steps and schedule steps of the gap table")
    p.add_argument("--gap-widths", nargs="+", type=int, default=(1, 4), help="beam widths of the gap table")
    p.add_argument("--gap-only", action="store_true", help="skip the validated search's budget table")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        print(gap_table([0], 8, 3, 4, 8, args.solvers))
        print()
        print(budget_table([4], 8, 60, 8, args.solvers))
        return
    n, m = args.gap_grid
    print(f"### Beam DP: gap to the enumerated optimum (N = {n}, M = {m}, 8 search samples, dim 16, 3 mixtures)\n")
    print(gap_table([0, 1, 2], n, m, 8, 16, args.solvers, tuple(args.gap_widths)))
    if args.gap_only:
        return
    print("\n### Validated search: model calls against the plain DP (16 search samples, N = 200, dim 32)\n")
    print(budget_table([4, 6, 8, 10], 16, 200, 32, args.solvers))


if __name__ == "__main__":
    main()
