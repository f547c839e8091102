"""Searched schedules against uniform and the released-code semantics, on held-out noise.

On the exact mixture model in all three processes, for euler and dpmpp2m: search on B noise samples,
then evaluate every schedule on E fresh noises (another seed) by the mean squared error of its output
against the exact probability-flow ODE solution. Run: python benchmarks/search_quality.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from optimalsteps import GaussianMixture, sample, search
from optimalsteps.core.schedules import uniform
from optimalsteps.optimize.options import DPOptions


def held_out_error(model, noise, exact, schedule, solver):
    return float((sample(model, noise, schedule, solver=solver).samples.double() - exact).pow(2).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--processes", default="flow,vp,ve")
    parser.add_argument("--solvers", default="euler,dpmpp2m")
    args = parser.parse_args()
    dim, samples, eval_samples, teacher_steps = (16, 4, 128, 60) if args.quick else (32, 8, 1024, 200)
    steps_list = [4, 6] if args.quick else [4, 6, 8, 10]
    torch.set_num_threads(2)
    print(f"mixture dim {dim}, 8 components (seed 0); search: {samples} samples, teacher {teacher_steps} steps; "
          f"held-out: {eval_samples} noises, error = MSE against the exact ODE solution")
    print()
    print("| process | solver | M | uniform | OSS released semantics | OSS (ours, joint) | OSS (ours, median) | "
          "OSS (ours, joint, free start) | best |")
    print("|---|---|---|---|---|---|---|---|---|")
    for process in args.processes.split(","):
        model = GaussianMixture.random(dim=dim, components=8, seed=0, process=process)
        noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(0))
        held = torch.randn(eval_samples, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        exact = model.exact_solution(held, rtol=1e-8, atol=1e-8)
        held = held.float()
        for solver in args.solvers.split(","):
            for steps in steps_list:
                row = {"uniform": held_out_error(model, held, exact, uniform(process, steps), solver)}
                if solver == "euler":
                    ref = search(model, noise, steps=steps, teacher_steps=teacher_steps,
                                 dp=DPOptions(reference_compat=True))
                    row["released"] = held_out_error(model, held, exact, ref.schedule, solver)
                for aggregate in ("joint", "median"):
                    r = search(model, noise, steps=steps, teacher_steps=teacher_steps, solver=solver,
                               dp=DPOptions(aggregate=aggregate))
                    row[aggregate] = held_out_error(model, held, exact, r.schedule, solver)
                r = search(model, noise, steps=steps, teacher_steps=teacher_steps, solver=solver,
                           dp=DPOptions(free_start=True), method="dp")
                row["free start"] = held_out_error(model, held, exact, r.schedule, solver)
                best = min(row, key=row.get)
                cells = [f"{row[k]:.4f}" if k in row else "n/a (euler only)" for k in
                         ("uniform", "released", "joint", "median", "free start")]
                print(f"| {process} | {solver} | {steps} | " + " | ".join(cells) + f" | {best} |", flush=True)


if __name__ == "__main__":
    main()
