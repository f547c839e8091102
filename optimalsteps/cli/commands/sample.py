"""`optimalsteps sample`: run a model on a schedule."""

from __future__ import annotations

import argparse
from typing import Any

from ...core.io import check_writable
from ...core.solvers import SOLVERS, sample
from ...optimize.calibration import AmplitudeCalibration
from ..args import add_model_args, add_noise_args, positive_int
from ..inputs import cond_from_args, guided, load_model_from_args, noise_from_args, save_array, schedule_from_args

DEFAULT_STEPS = 10  # with a built-in schedule name and no --steps


def add(sub: Any) -> None:
    p = sub.add_parser("sample", help="sample a model on a schedule")
    add_model_args(p)
    add_noise_args(p, samples_default=16)
    p.add_argument("--schedule", default="uniform", help="a schedule file (.json) or a built-in name")
    p.add_argument("--steps", type=positive_int, default=None, help="number of steps (default 10 for a name)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--calibrate", default=None, choices=["scale", "affine"],
                   help="amplitude calibration from a searched schedule's statistics (off by default)")
    p.add_argument("--out", default=None, help="write the final samples to this .npy file")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.steps is None and not args.schedule.endswith(".json"):
        args.steps = DEFAULT_STEPS
    check_writable(args.out, args.force)
    model = guided(load_model_from_args(args), args)
    schedule = schedule_from_args(args.schedule, model.process, args.steps)
    calibration = None
    if args.calibrate:
        calibration = AmplitudeCalibration.from_schedule(schedule, args.calibrate)
    noise = noise_from_args(args, model)
    cond = cond_from_args(args, model, noise.shape[0])
    result = sample(model, noise, schedule, solver=args.solver, cond=cond, calibration=calibration, progress=True)
    if args.out:
        save_array(args.out, result.samples, args.force)
    print(f"sampled {noise.shape[0]} x {list(noise.shape[1:])} with {args.solver} on {schedule.steps} steps "
          f"({result.nfe} NFE, {result.seconds:.2f}s)")
    print("schedule:", ", ".join(f"{v:.4g}" for v in schedule.times.tolist()))
    if args.out:
        print(f"wrote {args.out}")
