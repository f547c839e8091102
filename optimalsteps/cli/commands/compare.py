"""`optimalsteps compare`: schedules side by side against the teacher on fresh noise (tables and plots)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ...core.errors import OptimalStepsError
from ...core.io import check_writable
from ...core.models import index_cond
from ...core.solvers import SOLVERS
from ...evaluation.compare import DEFAULT_SCHEDULES, compare, report_paths, write_report
from ..args import (add_diffusers_args, add_model_args, add_noise_args, int_list, name_list, parse_options,
                    positive_int)
from ..inputs import cond_from_args, search_inputs


def add(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare schedules against the teacher on fresh noise (tables and plots)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)  # the search noise
    add_diffusers_args(p)
    p.add_argument("--steps", type=int_list, default=[3, 5, 8, 10], help="step counts (default 3,5,8,10)")
    p.add_argument("--solvers", type=name_list, default=["euler", "dpmpp2m"],
                   help=f"comma-separated, from {', '.join(sorted(SOLVERS))} (default euler,dpmpp2m)")
    p.add_argument("--schedules", type=name_list, default=list(DEFAULT_SCHEDULES),
                   help=f"comma-separated names (default {','.join(DEFAULT_SCHEDULES)}; `optimalsteps schedule list`)")
    p.add_argument("--eval-samples", type=positive_int, default=512, help="fresh evaluation samples (default 512)")
    p.add_argument("--eval-seed", type=int, default=None, help="seed of the evaluation noise (default seed + 1000003)")
    p.add_argument("--teacher-steps", type=positive_int, default=200, help="teacher steps N (default 200)")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="an option of one schedule, e.g. shift.mu=1.15 or oss.cost=x0 (repeatable)")
    p.add_argument("--max-batch", type=positive_int, default=4096, help="largest batch of one model call")
    p.add_argument("--out", required=True, help="directory for results.json/.csv/.md and plots")
    p.add_argument("--force", action="store_true", help="overwrite existing result files")
    p.set_defaults(func=run)


def schedule_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """NAME.KEY=VALUE pairs into {name: {key: value}}."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot:
            raise OptimalStepsError(f"--option {pair!r} is not NAME.KEY=VALUE (e.g. shift.mu=1.15)")
        options.setdefault(name, {}).update(parse_options([rest]))
    return options


def run(args: argparse.Namespace) -> None:
    for path in report_paths(args.out):
        check_writable(path, args.force)
    options = schedule_options(args.option)
    model, noise, cond, metadata = search_inputs(args)
    eval_cond = None
    if cond and getattr(model, "num_classes", None) is not None and not args.model.startswith("diffusers:"):
        eval_cond = cond_from_args(args, model, args.eval_samples)
    elif cond and args.model.startswith("diffusers:"):  # the encoded prompts, cycled over the evaluation samples
        eval_cond = index_cond(cond, torch.arange(args.eval_samples) % noise.shape[0])
    result = compare(model, args.steps, args.solvers, args.schedules, samples=noise.shape[0],
                     eval_samples=args.eval_samples, seed=args.seed, eval_seed=args.eval_seed,
                     teacher_steps=args.teacher_steps, cond=cond, eval_cond=eval_cond, noise=noise, options=options,
                     max_batch=args.max_batch, progress=True)
    if metadata:
        result.reference["model_metadata"] = metadata
    paths = write_report(result, args.out, overwrite=args.force)
    for solver in args.solvers:
        for steps in sorted(set(args.steps)):
            block = [r for r in result.rows if r["solver"] == solver and r["steps"] == steps]
            best = min(block, key=lambda r: r["mse"])
            print(f"{solver:>8} {steps:>3} steps: lowest MSE vs teacher {best['schedule']} ({best['mse']:.4g})")
    print(f"wrote {', '.join(p.name for p in paths)} to {args.out}")
