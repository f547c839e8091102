"""Which selection rule and how many validation samples: measured on held-out noise, not argued.

For each (mixture, solver, steps) cell the validated search is run with a budget large enough that every
candidate is built on the full teacher grid, and every candidate of its pool is sampled on up to
--validation fresh noises (with their teacher) and on --eval-samples held-out noises (with theirs). Then,
offline, each rule picks a winner from the first V validation samples and the winner is checked against
issue 12's targets on the held-out noise, as benchmarks/quality_targets.py checks them (PSNR within 0.1 dB
of the best fixed schedule, sliced W2 to data <= 1.05x the best fixed schedule's, p99 error <= 1.1x
uniform's; the fixed schedules here are the validated search's own: closed forms, DM, tables).

Rules: `best-tenth` (the worst tenth <= 1.1x the best baseline's; the rule before the uniform guard),
`uniform-far` (far tail <= 1.1x uniform's), `max-far` (far tail <= 1.1x the larger of uniform's and the
best baseline's; the shipped rule), each alone or with the data guard (`+data`) and the best-tenth guard
(`+tenth`); the best baseline and uniform stay eligible in all. Pool ablations: without the fitted
families, without the DP variants, the DP alone with the fixed schedules. `oracle`: the cells where some
candidate of the pool meets all three targets.

Run: nice -n 10 python benchmarks/selection_rules.py [--beds vp-32-0,ve-32-0] [--solvers euler,heun,dpmpp2m]
     [--steps 4,8] [--validation 256] [--eval-samples 1024] [--pool FILE.pkl] [--report-only]
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path
from typing import Callable

import torch

from optimalsteps.core.models import draw_noise, model_teacher_grid
from optimalsteps.core.solvers import sample
from optimalsteps.evaluation.compare import EVAL_SEED_OFFSET
from optimalsteps.evaluation.metrics import mode_change_rate, sliced_wasserstein
from optimalsteps.optimize import select
from optimalsteps.optimize.objectives import aggregate, per_sample_error
from optimalsteps.testbeds.mixture import GaussianMixture


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beds", default="vp-32-0,ve-32-0", help="process-dim-seed (mixture seed 100 + seed)")
    p.add_argument("--solvers", default="euler,heun,dpmpp2m")
    p.add_argument("--steps", default="4,8")
    p.add_argument("--validation", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--sizes", default="32,64,128,256", help="validation set sizes the rules are tried with")
    p.add_argument("--pool", default="selection_pools.pkl", help="where the sampled pools are kept")
    p.add_argument("--report-only", action="store_true", help="only analyse the pools already in --pool")
    return p.parse_args()


def capture_pool(model, noise, steps, teacher, solver, validation: int) -> list:
    """The validated search's candidates (its pool) with every variant on the full grid (a large budget)."""
    seen = {}
    choose = select._choose

    def spy(pool):
        seen["pool"] = list(pool)
        return choose(pool)

    select._choose = spy
    try:
        select.validated_search(model, noise, steps, teacher, solver, validation_samples=validation, seed=0,
                                budget=50.0)
    finally:
        select._choose = choose
    return seen["pool"]


def sample_pools(args: argparse.Namespace) -> list[dict]:
    """Per cell and candidate: its errors and data distance on validation and on held-out noise."""
    records = []
    for bed in args.beds.split(","):
        process, dim, seed = bed.split("-")
        model = GaussianMixture.random(dim=int(dim), components=8, seed=100 + int(seed), process=process)
        noise = draw_noise(model, 16, 0)
        held = draw_noise(model, args.eval_samples, EVAL_SEED_OFFSET)
        data = model.data_samples(max(4096, args.eval_samples), torch.Generator().manual_seed(5))
        teacher = model_teacher_grid(model, 200)
        val = select.validation_noise(noise, args.validation, 0)
        for solver in args.solvers.split(","):
            held_teacher = sample(model, held, teacher, solver=solver).samples
            val_teacher = sample(model, val, teacher, solver=solver).samples
            for steps in (int(s) for s in args.steps.split(",")):
                started = time.perf_counter()
                for c in capture_pool(model, noise, steps, teacher, solver, args.validation):
                    out_val = sample(model, val, c.schedule, solver=solver).samples
                    out_held = sample(model, held, c.schedule, solver=solver).samples
                    records.append({
                        "bed": bed, "solver": solver, "steps": steps, "name": c.name,
                        "fixed": c.nfe == 0 and c.indices is None,
                        "val_err": per_sample_error(out_val, val_teacher), "val_data": sliced_wasserstein(out_val, data),
                        "held_err": per_sample_error(out_held, held_teacher),
                        "held_data": sliced_wasserstein(out_held, data[:args.eval_samples]),
                        "held_mode": mode_change_rate(model, out_held, held_teacher)})
                print(f"{bed} {solver} {steps}: {time.perf_counter() - started:.0f}s", flush=True)
    return records


def worst_mean(errors: torch.Tensor, fraction: float, least: int) -> float:
    count = min(len(errors), max(least, math.ceil(round(fraction * len(errors), 9))))
    return float(torch.topk(errors, count).values.mean())


def choose(pool: list[dict], size: int, tail: str | None, tenth: bool, data: bool) -> dict:
    """The winner of `pool` by the log objective on the first `size` validation samples under a rule."""
    errors = {r["name"]: r["val_err"][:size] for r in pool}
    score = {name: float(aggregate(e, "log")) for name, e in errors.items()}
    far = {name: worst_mean(e, 0.01, 2) for name, e in errors.items()}
    worst_tenth = {name: worst_mean(e, 0.1, 1) for name, e in errors.items()}
    fixed = [r for r in pool if r["fixed"]]
    best = min(fixed, key=lambda r: score[r["name"]])
    uniform = next(r for r in fixed if r["name"] == "uniform")
    reference = far["uniform"] if tail == "uniform" else max(far["uniform"], far[best["name"]])
    closest = min(r["val_data"] for r in fixed)
    eligible = []
    for r in pool:
        ok = (tail is None or far[r["name"]] <= 1.1 * reference) and \
             (not tenth or worst_tenth[r["name"]] <= 1.1 * worst_tenth[best["name"]]) and \
             (not data or r["val_data"] <= 1.05 * closest)
        if ok or r is best or r is uniform:
            eligible.append(r)
    return min(eligible, key=lambda r: score[r["name"]])


def targets(cell: list[dict], winner: dict) -> tuple[bool, bool, bool]:
    """Issue 12's three targets for `winner` on the held-out noise, against the cell's fixed schedules."""
    def psnr(e: torch.Tensor) -> float:  # data range 1: only differences of PSNR matter here
        return float((-10 * torch.log10(e.clamp(min=1e-30))).mean())

    fixed = [r for r in cell if r["fixed"]]
    uniform = next(r for r in fixed if r["name"] == "uniform")
    return (psnr(winner["held_err"]) >= max(psnr(r["held_err"]) for r in fixed) - 0.1,
            winner["held_data"] <= 1.05 * min(r["held_data"] for r in fixed),
            float(torch.quantile(winner["held_err"], 0.99)) <= 1.1 * float(torch.quantile(uniform["held_err"], 0.99)))


RULES = {"best-tenth": (None, True, False), "best-tenth+data": (None, True, True),
         "uniform-far": ("uniform", False, False), "uniform-far+tenth+data": ("uniform", True, True),
         "max-far": ("max", False, False), "max-far+data": ("max", False, True),
         "max-far+tenth+data": ("max", True, True)}
POOLS: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "no fits": lambda name: not name.startswith("fit-"),
    "no DP variants": lambda name: name == "dp-log" or not name.startswith("dp-"),
    "DP + fixed": lambda name: name == "dp-log" or not name.startswith(("dp-", "fit-"))}


def report(records: list[dict], sizes: list[int]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["bed"], r["solver"], r["steps"]), []).append(r)
    lines = [f"{len(cells)} cells; counts of cells meeting PSNR / data / p99 / all three on held-out noise", "",
             "| rule | pool | " + " | ".join(f"V = {v}" for v in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]

    def row(rule: str, pool_name: str) -> str:
        tail, tenth, data = RULES[rule]
        counts = []
        for size in sizes:
            hits = [0, 0, 0, 0]
            for cell in cells.values():
                pool = [r for r in cell if r["fixed"] or POOLS[pool_name](r["name"])]
                p, d, t = targets(cell, choose(pool, size, tail, tenth, data))
                for i, ok in enumerate((p, d, t, p and d and t)):
                    hits[i] += ok
            counts.append(" / ".join(str(h) for h in hits))
        return f"| {rule} | {pool_name} | " + " | ".join(counts) + " |"

    lines += [row(rule, "all") for rule in RULES]
    lines += [row("max-far+tenth+data", pool) for pool in POOLS if pool != "all"]
    oracle = sum(any(all(targets(cell, r)) for r in cell) for cell in cells.values())
    lines += ["", f"oracle (some candidate of the pool meets all three): {oracle} of {len(cells)} cells"]
    return "\n".join(lines)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    path = Path(args.pool)
    if args.report_only:
        records = pickle.loads(path.read_bytes())
    else:
        records = sample_pools(args)
        path.write_bytes(pickle.dumps(records))
    print(report(records, [int(v) for v in args.sizes.split(",") if int(v) <= args.validation]))


if __name__ == "__main__":
    main()
