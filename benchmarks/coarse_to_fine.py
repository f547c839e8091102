"""Coarse-to-fine search against the full search on the same 200-point teacher grid: model calls, wall time,
the DP's final cost on the search samples and the error on held-out noise.

For every model, solver and step count M, `search(...)` and `search(..., dp=DPOptions(coarse_to_fine=True))` run on the
same B search samples with the same teacher; both schedules are then scored on E held-out noises (mean
squared error against the exact ODE solution for mixtures, against the teacher of the same solver on the
same noise for the digits models). The held-out ratio comes with the standard error of the paired
per-sample differences. Wall times are single-threaded on a shared machine: compare them within a row.

Run: python benchmarks/coarse_to_fine.py [--quick] [--part mixtures|digits|all]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from optimalsteps import GaussianMixture, load_model, sample, search
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.options import DPOptions


def per_sample_error(model, noise, schedule, solver, reference, chunk=1024):
    out = []
    for start in range(0, noise.shape[0], chunk):
        x = sample(model, noise[start:start + chunk], schedule, solver=solver).samples
        out.append((x.double() - reference[start:start + chunk].double()).reshape(x.shape[0], -1).pow(2).mean(1))
    return torch.cat(out)


def timed_search(model, noise, steps, teacher_steps, solver, fast):
    started = time.perf_counter()
    result = search(model, noise, steps=steps, teacher_steps=teacher_steps, solver=solver,
                    dp=DPOptions(coarse_to_fine=fast), method="dp")
    return result, time.perf_counter() - started


def rows_for(model, name, noise, held, exact, solvers, steps_list, teacher_steps, summary):
    for solver in solvers:
        reference = exact
        if reference is None:
            teacher = default_teacher_grid(model.process, teacher_steps)
            reference = torch.cat([sample(model, held[s:s + 1024], teacher, solver=solver).samples
                                   for s in range(0, held.shape[0], 1024)])
        for steps in steps_list:
            full, t_full = timed_search(model, noise, steps, teacher_steps, solver, False)
            fast, t_fast = timed_search(model, noise, steps, teacher_steps, solver, True)
            e_full = per_sample_error(model, held, full.schedule, solver, reference)
            e_fast = per_sample_error(model, held, fast.schedule, solver, reference)
            base = float(e_full.mean())
            held_ratio = float(e_fast.mean()) / base
            se = float((e_fast - e_full).std() / math.sqrt(len(e_full))) / base
            nfe_ratio = fast.nfe / full.nfe
            dp_nfe_ratio = (fast.nfe - fast.teacher_nfe) / (full.nfe - full.teacher_nfe)
            levels = fast.schedule.metadata["coarse_to_fine"]
            shape = f"{levels['coarse_steps']}" + "".join(f"→{lv['stride']}(±{lv['window']})×{lv['rounds']}"
                                                         for lv in levels["levels"])
            same = "yes" if fast.indices == full.indices else "no"
            summary.append((nfe_ratio, held_ratio, se, fast.dp_cost / full.dp_cost))
            print(f"| {name} | {solver} | {steps} | {full.nfe} | {fast.nfe} | {nfe_ratio:.2f} | {dp_nfe_ratio:.2f} | "
                  f"{t_full:.1f} | {t_fast:.1f} | {shape} | {same} | {fast.dp_cost / full.dp_cost:.3f} | {base:.4g} | "
                  f"{float(e_fast.mean()):.4g} | {held_ratio:.3f} ± {se:.3f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--part", default="all", choices=["mixtures", "digits", "all"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread avoids contention on shared cores
    quick = args.quick
    teacher_steps = 60 if quick else 200
    samples = 8
    print(f"Search on {samples} samples, teacher {teacher_steps} steps (default grid), coarse-to-fine with its "
          f"defaults (coarse grid max(2M, N/16) steps, stride / 4 per level, bands of half the previous stride, "
          f"at most 2 rounds per level).\n")
    print("| model | solver | M | NFE full | NFE c2f | NFE ratio | DP-only ratio | s full | s c2f | levels | "
          "same schedule | DP cost ratio | held-out full | held-out c2f | held-out ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    summary = []
    if args.part in ("mixtures", "all"):
        dim, held_count = (16, 256) if quick else (64, 4096)
        steps_list = [4, 6] if quick else [4, 6, 8, 10]
        for process in ("flow", "vp", "ve"):
            model = GaussianMixture.random(dim=dim, components=8, seed=0, process=process)
            noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(0))
            held = torch.randn(held_count, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            exact = model.exact_solution(held, rtol=1e-8, atol=1e-8)
            rows_for(model, f"gmm {process}", noise, held.float(), exact, ("euler", "dpmpp2m", "heun"), steps_list,
                     teacher_steps, summary)
    if args.part in ("digits", "all"):
        held_count = 64 if quick else 256
        steps_list = [4] if quick else [4, 8]
        for name in ("digits-flow", "digits-vp"):
            model = load_model(name)
            shape = tuple(model.sample_shape)
            noise = torch.randn((samples,) + shape, generator=torch.Generator().manual_seed(0))
            held = torch.randn((held_count,) + shape, generator=torch.Generator().manual_seed(1))
            rows_for(model, name, noise, held, None, ("euler", "dpmpp2m"), steps_list, teacher_steps, summary)
    nfe = [s[0] for s in summary]
    held = [s[1] for s in summary]
    worse = sum(1 for _, h, se, _ in summary if h > 1.01 + 2 * se)
    print(f"\n{len(summary)} rows: NFE ratio {min(nfe):.2f}..{max(nfe):.2f} (geometric mean "
          f"{math.exp(sum(map(math.log, nfe)) / len(nfe)):.2f}); held-out ratio geometric mean "
          f"{math.exp(sum(map(math.log, held)) / len(held)):.3f}, median {sorted(held)[len(held) // 2]:.3f}; "
          f"rows with NFE ratio <= 0.25: {sum(1 for r in nfe if r <= 0.25)}; rows worse than +1% by more than "
          f"2 standard errors: {worse}")


if __name__ == "__main__":
    main()
