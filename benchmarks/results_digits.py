"""Compare tables on the trained digit models: prints the markdown for docs/results-digits.md.

For each model (digits-flow, digits-vp, mnist-flow-cfg at guidance 2), `optimalsteps.evaluation.compare` searches
OSS (and GITS) on the search noise, then evaluates every schedule with euler and dpmpp2m at 3, 5, 8 and
10 steps on fresh noise against the 200-step teacher on the same noise, and against held-out real images
(SW2, MMD², and FD: the Fréchet distance in the features of a classifier trained here on the same data).

Run: python benchmarks/results_digits.py [--quick] [--models digits-flow,...]
"""

from __future__ import annotations

import argparse
import time

import torch

from optimalsteps.evaluation.compare import compare, markdown_table
from optimalsteps.testbeds.registry import load_model

SCHEDULES = ["oss", "uniform", "karras", "logsnr", "shift", "kl-optimal", "beta", "gits", "dm"]


def run(spec: str, steps: list[int], samples: int, eval_samples: int, teacher_steps: int) -> list[dict]:
    model = load_model(spec)
    cond = eval_cond = None
    if getattr(model, "num_classes", None):
        # class-conditional: search and evaluation labels cycle over the classes
        cond = {"labels": torch.arange(samples) % model.num_classes}
        eval_cond = {"labels": torch.arange(eval_samples) % model.num_classes}
    result = compare(model, steps=steps, solvers=["euler", "dpmpp2m"], schedules=SCHEDULES, samples=samples,
                     eval_samples=eval_samples, seed=0, teacher_steps=teacher_steps, cond=cond, eval_cond=eval_cond,
                     progress=True)
    return result.rows


def oss_verdicts(rows: list[dict]) -> list[str]:
    """Where OSS does not have the lowest error against the teacher: the winner and the margin."""
    out = []
    for solver in dict.fromkeys(r["solver"] for r in rows):
        for m in sorted({r["steps"] for r in rows}):
            block = [r for r in rows if r["solver"] == solver and r["steps"] == m]
            oss = next(r for r in block if r["schedule"] == "oss")
            best = min(block, key=lambda r: r["mse"])
            if best["schedule"] != "oss":
                out.append(f"{solver} {m} steps: `{best['schedule']}` {best['mse']:.4g} vs OSS {oss['mse']:.4g} "
                           f"(OSS {oss['mse'] / best['mse']:.2f}x)")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="digits-flow,digits-vp,mnist-flow-cfg")
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default 3,5,8,10)")
    parser.add_argument("--eval-samples", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps, samples, eval_samples, teacher = ([3, 5], 4, 32, 40) if args.quick else ([3, 5, 8, 10], 8, 256, 200)
    steps = [int(v) for v in args.steps.split(",")] if args.steps else steps
    eval_samples = args.eval_samples or eval_samples
    print(f"search: {samples} samples; evaluation: {eval_samples} fresh noises; teacher {teacher} steps of "
          "the same solver on the default grid")
    for spec in args.models.split(","):
        started = time.perf_counter()
        rows = run(spec, steps, samples, eval_samples, teacher)
        print(f"\n## {spec}\n\n({time.perf_counter() - started:.0f} s)\n")
        for solver in ("euler", "dpmpp2m"):
            print(f"### {solver}\n")
            print(markdown_table([r for r in rows if r["solver"] == solver]))
            print()
        verdicts = oss_verdicts(rows)
        print("Where OSS does not have the lowest MSE against the teacher: " +
              ("; ".join(verdicts) if verdicts else "nowhere") + ".", flush=True)


if __name__ == "__main__":
    main()
