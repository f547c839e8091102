"""`optimalsteps demo`: search and compare schedules on a built-in digits model; write a report."""

from __future__ import annotations

import argparse
from typing import Any

from ...evaluation.demo import DEFAULT_MODEL, DEMO_SCHEDULES, check_demo_args, run_demo
from ..args import int_list, name_list, positive_int


def add(sub: Any) -> None:
    p = sub.add_parser("demo", help="search and compare schedules on a built-in digits model; write a report")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument("--out", default="optimalsteps-demo", help="report folder (default optimalsteps-demo)")
    p.add_argument("--steps", type=int_list, default=[5, 10], help="step counts (default 5,10)")
    p.add_argument("--solvers", type=name_list, default=["euler", "dpmpp2m"])
    p.add_argument("--schedules", type=name_list, default=list(DEMO_SCHEDULES))
    p.add_argument("--samples", type=positive_int, default=16, help="search samples (default 16)")
    p.add_argument("--eval-samples", type=positive_int, default=256, help="held-out samples (default 256)")
    p.add_argument("--teacher-steps", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds): 5 steps, euler, small sets")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.quick:
        args.steps, args.solvers, args.samples, args.eval_samples, args.teacher_steps = [5], ["euler"], 4, 32, 40
        args.schedules = [s for s in args.schedules if s not in ("gits", "dm")]
    check_demo_args(args.steps, args.samples, args.eval_samples)
    report = run_demo(args.out, args.model, args.steps, args.solvers, args.schedules, args.samples,
                      args.eval_samples, args.teacher_steps, args.seed, overwrite=args.force)
    print(report.read_text().split("## Samples")[0].split("## Headline", 1)[-1].strip())
    print(f"wrote {report} (open it first) and the compare outputs beside it")
