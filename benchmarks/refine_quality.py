"""Refined searched schedules against the DP's and the best baseline, on held-out noise.

For every model, solver and step count M: the OSS dynamic program on B search samples (`oss`), its
refinement off the grid (`optimalsteps.optimize.refine`, Nelder-Mead, starting from the best on the refinement
samples of the DP's schedule and every baseline) measured on the B search samples (`refined`) and on R
samples (`refined RN`: the B search samples plus R - B more with their own teacher run), and every baseline
`optimalsteps.evaluation.baselines` makes (closed forms, published tables, dm, gits, boss). Every schedule is then
scored on E held-out noises: the mean squared error of its output against the exact ODE solution
(mixtures) or against a teacher of the same solver on the same noise (digits models, which have no
exact solution). Ratios to the best baseline come with the standard error of the paired per-sample
differences. A second table gives, for each M, the smallest K such that uniform Euler with K * M steps
is at least as accurate as the refined DPM-Solver++(2M) schedule.

Run: python benchmarks/refine_quality.py [--quick] [--part mixtures|digits|all]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from optimalsteps import GaussianMixture, load_model, sample, search
from optimalsteps.evaluation.baselines import baseline_starts
from optimalsteps.optimize.refine import refine_schedule
from optimalsteps.core.schedules import uniform
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.core.solvers import nfe_per_trajectory

SOLVERS = ("euler", "heun", "dpmpp2m")


def per_sample_error(model, noise, schedule, solver, reference, chunk=1024):
    """Per-sample mean squared error [E] of the solver's outputs on `schedule` against `reference`."""
    out = []
    for start in range(0, noise.shape[0], chunk):
        x = sample(model, noise[start:start + chunk], schedule, solver=solver).samples
        diff = (x.double() - reference[start:start + chunk].double()).reshape(x.shape[0], -1)
        out.append(diff.pow(2).mean(1))
    return torch.cat(out)


def ratio(errors, other):
    """mean(errors) / mean(other) and the standard error of that ratio from the paired differences."""
    base = float(other.mean())
    diff = errors - other
    return float(errors.mean()) / base, float(diff.std() / math.sqrt(len(diff))) / base


def teacher_outputs(model, noise, solver, teacher_steps, chunk=1024):
    teacher = default_teacher_grid(model.process, teacher_steps)
    return torch.cat([sample(model, noise[s:s + chunk], teacher, solver=solver).samples
                      for s in range(0, noise.shape[0], chunk)])


def evaluate(model, name, noise, held, exact, steps_list, args, kmax):
    """Rows of the quality table and of the K * M table for one model."""
    rows, k_rows = [], []
    refine_samples = args.refine_samples
    extra = torch.randn((refine_samples - args.samples,) + tuple(noise.shape[1:]),
                        generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(noise.dtype)
    extra_noise = torch.cat([noise, extra])
    refined_dpm = {}
    for solver in args.solvers:
        reference = exact if exact is not None else teacher_outputs(model, held, solver, args.teacher_steps)
        extra_target = teacher_outputs(model, extra, solver, args.teacher_steps)
        for steps in steps_list:
            started = time.perf_counter()
            dp = search(model, noise, steps=steps, teacher_steps=args.teacher_steps, solver=solver, method="dp")
            baselines, baseline_nfe = baseline_starts(model, noise, steps, solver)
            starts = {"oss": dp.schedule, **baselines}
            small = refine_schedule(model, noise, starts, solver, dp.teacher_samples)
            big = refine_schedule(model, extra_noise, starts, solver,
                                  torch.cat([dp.teacher_samples, extra_target.to(dp.teacher_samples.dtype)]))
            errors = {n: per_sample_error(model, held, s, solver, reference) for n, s in starts.items()}
            best = min((n for n in errors if n != "oss"), key=lambda n: float(errors[n].mean()))
            e_small = per_sample_error(model, held, small.schedule, solver, reference)
            e_big = per_sample_error(model, held, big.schedule, solver, reference)
            r_small, se_small = ratio(e_small, errors[best])
            r_big, se_big = ratio(e_big, errors[best])
            gain_small = float(e_small.mean()) / float(errors["oss"].mean())
            teacher_extra = (refine_samples - args.samples) * nfe_per_trajectory(solver, args.teacher_steps)
            rows.append(f"| {name} | {solver} | {steps} | {float(errors['oss'].mean()):.4g} | "
                        f"{float(e_small.mean()):.4g} ({small.start}) | {float(e_big.mean()):.4g} ({big.start}) | "
                        f"{float(errors[best].mean()):.4g} ({best}) | {r_small:.2f} ± {se_small:.2f} | "
                        f"{r_big:.2f} ± {se_big:.2f} | {gain_small:.2f} | {dp.nfe} | "
                        f"{small.nfe + baseline_nfe} | {big.nfe + baseline_nfe + teacher_extra} |")
            print(rows[-1], f"<!-- {time.perf_counter() - started:.0f}s -->", flush=True)
            if solver == "dpmpp2m":
                refined_dpm[steps] = {f"R{args.samples}": e_small, f"R{refine_samples}": e_big}
    if "dpmpp2m" in args.solvers:
        # one reference for both: the exact solution, else the (more accurate) DPM-Solver++(2M) teacher
        reference = exact if exact is not None else teacher_outputs(model, held, "dpmpp2m", args.teacher_steps)
        for steps in steps_list:
            uniform_errors = {}
            cells = []
            for label, e in refined_dpm[steps].items():
                target = float(e.mean())
                k_found = None
                for k in range(1, kmax + 1):
                    if k not in uniform_errors:
                        uniform_errors[k] = float(per_sample_error(model, held, uniform(model.process, k * steps),
                                                                   "euler", reference).mean())
                    if uniform_errors[k] <= target:
                        k_found = k
                        break
                cells.append(f"{target:.4g} | {k_found if k_found else f'> {kmax}'}")
            k_rows.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {uniform_errors.get(1, math.nan):.4g} |")
    return rows, k_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--part", default="mixtures", choices=["mixtures", "digits", "all"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread avoids contention on shared cores
    quick = args.quick
    args.solvers = SOLVERS
    args.samples = 8
    if args.part in ("mixtures", "all"):
        dim, held_count = (16, 256) if quick else (64, 4096)
        args.teacher_steps, args.refine_samples = (60, 128) if quick else (200, 1024)
        steps_list = [4, 6] if quick else [4, 6, 8, 10]
        print(f"#### Mixtures: dim {dim}, 8 components (seed 0); search on {args.samples} samples, teacher "
              f"{args.teacher_steps} steps; refined on the {args.samples} search samples and on "
              f"{args.refine_samples}; held-out: {held_count} noises, error against the exact ODE solution\n")
        header(args)
        all_k = []
        for process in ("flow", "vp", "ve"):
            model = GaussianMixture.random(dim=dim, components=8, seed=0, process=process)
            noise = torch.randn(args.samples, dim, generator=torch.Generator().manual_seed(0))
            held = torch.randn(held_count, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            exact = model.exact_solution(held, rtol=1e-8, atol=1e-8)
            rows, k_rows = evaluate(model, f"gmm {process}", noise, held.float(), exact, steps_list, args, 16)
            all_k += k_rows
        k_table(args, all_k)
    if args.part in ("digits", "all"):
        held_count = 64 if quick else 256
        args.teacher_steps, args.refine_samples = (40, 16) if quick else (100, 16)
        args.solvers = ("euler", "dpmpp2m")
        steps_list = [4] if quick else [4, 8]
        print(f"\n#### Digits models (8x8 digits): search on {args.samples} samples, teacher {args.teacher_steps} "
              f"steps; refined on the {args.samples} search samples and on {args.refine_samples}; held-out: "
              f"{held_count} noises, error against the {args.teacher_steps}-step teacher of the same solver\n")
        header(args)
        all_k = []
        for name in ("digits-flow", "digits-vp"):
            model = load_model(name)
            noise = torch.randn((args.samples,) + tuple(model.sample_shape), generator=torch.Generator().manual_seed(0))
            held = torch.randn((held_count,) + tuple(model.sample_shape), generator=torch.Generator().manual_seed(1))
            rows, k_rows = evaluate(model, name, noise, held, None, steps_list, args, 8)
            all_k += k_rows
        k_table(args, all_k)


def header(args):
    print(f"| model | solver | M | oss | refined R{args.samples} (start) | refined R{args.refine_samples} (start) | "
          f"best baseline | R{args.samples} / best | R{args.refine_samples} / best | R{args.samples} / oss | "
          f"search NFE | refine NFE R{args.samples} | refine NFE R{args.refine_samples} |")
    print("|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|")


def k_table(args, rows):
    print("\nSmallest K such that uniform Euler with K·M steps matches refined DPM-Solver++(2M) with M steps "
          "(same held-out error):\n")
    print(f"| model | M | refined R{args.samples} error | K | refined R{args.refine_samples} error | K | "
          f"uniform Euler M steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
