"""`optimalsteps schedule`: print or write a named schedule (`optimalsteps schedule list` names them)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ...core.errors import OptimalStepsError
from ...core.checks import check_distinct_paths, check_output_file, check_steps_bound
from ...core.schedules import parse_process
from ...core.solvers import SOLVERS
from ...evaluation.baselines import describe, make_schedule, schedule_names
from ..args import add_diffusers_args, add_expert_args, add_noise_args, parse_options, positive_int
from ..inputs import check_high_steps, search_inputs, two_experts


def add(sub: Any) -> None:
    p = sub.add_parser("schedule", help="print or write a named schedule (`optimalsteps schedule list` names them)")
    p.add_argument("name", help="a schedule name, or `list`")
    p.add_argument("--process", default=None, help="flow, vp, ve or ve(sigma_max=S) (default: the model's, else flow)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--family", default=None, help="model family of a published table (ays: sd15, sdxl, svd; "
                                                  "oss-table: flux, wan, chroma)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS), help="the solver dm / oss are made for")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. rho=5, mu=1.15, coeff=1.2, teacher_steps=100 (repeatable)")
    p.add_argument("--model", default=None, help="model spec, needed by the searched schedules (gits, boss, oss)")
    p.add_argument("--label", type=int, default=None, help="class label for a class-conditional model")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    add_noise_args(p, samples_default=8)
    add_diffusers_args(p)
    add_expert_args(p)
    p.add_argument("--out", default=None, help="write the schedule to this .json file (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.name == "list":
        for name in schedule_names():
            print(f"{name:<12}{describe(name)}")
        return
    if args.steps is None:
        raise OptimalStepsError("--steps is required")
    check_output_file(args.out, args.force)
    check_distinct_paths({"--out": args.out, "--noise": args.noise})
    check_steps_bound(args.steps, args.allow_huge, "--steps")
    options = parse_options(args.option)
    if args.family:
        options["family"] = args.family
    process = parse_process(args.process) if args.process else None
    check_high_steps(args, [args.steps])
    model = noise = cond = None
    metadata: dict[str, Any] = {}
    if args.model:
        model, noise, cond, metadata = search_inputs(args)
    elif process is None:
        process = parse_process("flow")
    if model is not None and two_experts(args, model):
        schedule = expert_schedule(args, process, model, noise, cond, options)
    else:
        schedule = make_schedule(args.name, process, args.steps, model=model, noise=noise, cond=cond,
                                 solver=args.solver, progress=model is not None, **options)
    schedule.metadata.update(metadata)
    if args.out:
        schedule.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(schedule.to_dict(), indent=2))


def expert_schedule(args: argparse.Namespace, process: Any, model: Any, noise: Any, cond: Any, options: dict) -> Any:
    """A named schedule for a two-expert pipeline (Wan 2.2): `oss` is the two-expert search, any other name is
    put onto the experts' boundary (integrations/diffusers/experts.py)."""
    from ...integrations.diffusers.experts import expert_schedules

    made = expert_schedules(args.name, process, [args.steps], model=model, noise=noise, cond=cond,
                            solver=args.solver, progress=True, high_steps=args.high_steps, **options)
    schedule = made[args.steps]
    moved = schedule.metadata.get("boundary_moved")
    print(f"experts: steps 1-{schedule.metadata['split_step']} on transformer, the rest on transformer_2"
          + (f"; moved step {moved['step']} from {moved['from']:.4g} onto the boundary "
             f"{schedule.metadata['boundary']:g}" if moved else ""), file=sys.stderr)
    return schedule
