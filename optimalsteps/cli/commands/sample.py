"""`optimalsteps sample`: run a model on a schedule."""

from __future__ import annotations

import argparse
from typing import Any


import torch

from ...core.checks import check_distinct_paths, check_output_file, check_steps_bound
from ...core.errors import OptimalStepsError
from ...core.solvers import SOLVERS, sample
from ...optimize.calibration import AmplitudeCalibration
from ..args import add_diffusers_args, add_model_args, add_noise_args, positive_int
from ..inputs import (check_diffusers_args, cond_from_args, diffusers_call_options, diffusers_prompts, guided,
                      images_per_prompt, load_model_from_args, noise_from_args, refuse_diffusers_only, save_array,
                      schedule_from_args)

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
    add_diffusers_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.steps is None and not args.schedule.endswith(".json"):
        args.steps = DEFAULT_STEPS
    check_output_file(args.out, args.force)
    check_distinct_paths({"--out": args.out, "--noise": args.noise, "--schedule": args.schedule})
    if args.steps is not None:
        check_steps_bound(args.steps, args.allow_huge, "--steps")
    if args.model.startswith("diffusers:"):
        run_pipeline(args)
        return
    refuse_diffusers_only(args)
    model = guided(load_model_from_args(args), args)
    schedule = schedule_from_args(args.schedule, model.process, args.steps, args.allow_huge)
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


def run_pipeline(args: argparse.Namespace) -> None:
    """`sample --model diffusers:...`: the schedule on the pipeline's own latents (`sample_pipeline`), written as
    the final latents `pipe(..., output_type="latent")` returns."""
    from ...integrations.diffusers.loading import load_pipeline
    from ...integrations.diffusers.run import sample_pipeline
    from ...integrations.diffusers.schedules import pipeline_process

    check_diffusers_args(args)
    if args.calibrate:
        raise OptimalStepsError("--calibrate does not apply to a diffusers pipeline")
    prompts = diffusers_prompts(args)
    if not prompts:
        raise OptimalStepsError("a diffusers model needs at least one --prompt (or --prompts-file)")
    pipe = load_pipeline(args.model[len("diffusers:"):], args.height, args.width)
    schedule = schedule_from_args(args.schedule, pipeline_process(pipe), args.steps, args.allow_huge)
    latents = sample_pipeline(pipe, prompts, schedule, args.guidance, args.height, args.width,
                              generator=torch.Generator().manual_seed(args.seed), solver=args.solver,
                              negative_prompt=args.negative_prompt, num_frames=args.num_frames, progress=True,
                              images_per_prompt=images_per_prompt(args, prompts),
                              **diffusers_call_options(args, pipe))
    if args.out:
        save_array(args.out, latents, args.force)
    print(f"sampled latents {list(latents.shape)} with {args.solver} on {schedule.steps} steps")
    print("schedule:", ", ".join(f"{v:.4g}" for v in schedule.times.tolist()))
    if args.out:
        print(f"wrote {args.out}")
