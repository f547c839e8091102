"""`optimalsteps compare`: schedules side by side against the teacher on fresh noise (tables and plots)."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...core.errors import OptimalStepsError
from ...core.checks import check_distinct_paths, check_output_dir, check_steps_bound
from ...core.models import index_cond
from ...core.schedules import Schedule
from ...core.solvers import SOLVERS
from ...evaluation.compare import DEFAULT_SCHEDULES, compare, report_paths, write_report
from ...evaluation.baselines import make_schedules
from ..args import (add_diffusers_args, add_expert_args, add_model_args, add_noise_args, int_list, name_list,
                    parse_options, positive_int)
from ..inputs import (check_high_steps, cond_from_args, diffusers_call_options, diffusers_inputs, diffusers_prompts,
                      images_per_prompt, search_inputs, two_experts)

IMAGE_REPORT = ("results.json", "results.md", "grid.png")  # what --images writes to OUT/images


def add(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare schedules against the teacher on fresh noise (tables and plots)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)  # the search noise
    add_diffusers_args(p)
    add_expert_args(p)
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
    p.add_argument("--images", action="store_true",
                   help="diffusers: also decode with the pipeline's VAE and score the images against the teacher's "
                        "(PSNR; LPIPS, CLIP score, FID where their packages and weights are at hand) in OUT/images, "
                        "with grid.png (teacher row first)")
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
    check_output_dir(args.out, [p.name for p in report_paths(args.out)], args.force)
    check_distinct_paths({"--out": args.out, "--noise": args.noise})
    check_steps_bound(args.teacher_steps, args.allow_huge, "--teacher-steps")
    options = schedule_options(args.option)
    check_high_steps(args, args.steps)
    pipe = None
    if args.images:
        if not args.model.startswith("diffusers:"):
            raise OptimalStepsError("--images applies only to --model diffusers:...")
        check_output_dir(Path(args.out) / "images", list(IMAGE_REPORT), args.force, "--out/images")
    if args.model.startswith("diffusers:"):
        pipe, model, noise, cond, metadata = diffusers_inputs(args, args.teacher_steps)
    else:
        model, noise, cond, metadata = search_inputs(args)
    eval_cond = None
    if cond and getattr(model, "num_classes", None) is not None and not args.model.startswith("diffusers:"):
        eval_cond = cond_from_args(args, model, args.eval_samples)
    elif cond and args.model.startswith("diffusers:"):  # the encoded prompts, cycled over the evaluation samples
        eval_cond = index_cond(cond, torch.arange(args.eval_samples) % noise.shape[0])
    make = make_schedules
    if two_experts(args, model):
        model, make = expert_compare(model, args)
    result = compare(model, args.steps, args.solvers, args.schedules, samples=noise.shape[0],
                     eval_samples=args.eval_samples, seed=args.seed, eval_seed=args.eval_seed,
                     teacher_steps=args.teacher_steps, cond=cond, eval_cond=eval_cond, noise=noise, options=options,
                     max_batch=args.max_batch, progress=True, make=make)
    if metadata:
        result.reference["model_metadata"] = metadata
    paths = write_report(result, args.out, overwrite=args.force)
    for solver in args.solvers:
        for steps in sorted(set(args.steps)):
            block = [r for r in result.rows if r["solver"] == solver and r["steps"] == steps]
            best = min(block, key=lambda r: r["mse"])
            print(f"{solver:>8} {steps:>3} steps: lowest MSE vs teacher {best['schedule']} ({best['mse']:.4g})")
    print(f"wrote {', '.join(p.name for p in paths)} to {args.out}")
    if args.images:
        compare_images(pipe, model, args, result)


def expert_compare(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """A two-expert pipeline's (Wan 2.2) model routed as its schedules run, and the maker that puts every compared
    schedule onto the experts' boundary: `oss` by the two-expert search (integrations/diffusers/experts.py)."""
    from ...integrations.diffusers.experts import boundary_routed, expert_schedules

    print(f"two experts: every schedule gets a step on the boundary {model.expert_split.boundary:g} (oss: the "
          f"constrained search{f' with {args.high_steps} high-noise steps' if args.high_steps else ''}; the others: "
          "their nearest point moved onto it)")
    return boundary_routed(model), partial(expert_schedules, high_steps=args.high_steps)


def compare_images(pipe: Any, model: Any, args: argparse.Namespace, result: Any) -> None:
    """The compared schedules again on the pipeline's latents from the evaluation seed, decoded and scored in
    image space against the teacher's images (integrations/diffusers_compare.py)."""
    from ...integrations.diffusers.common import device_of
    from ...integrations.diffusers_compare import compare_pipeline, default_image_metrics, write_comparison

    schedules = {f"{row['schedule']} {row['solver']} {row['steps']}":
                 Schedule(row["times"], model.process, solver=row["solver"]) for row in result.rows}
    prompts = diffusers_prompts(args)
    images = compare_pipeline(pipe, prompts, schedules, args.teacher_steps, guidance_scale=args.guidance,
                              height=args.height, width=args.width, seed=result.reference["eval_seed"],
                              metrics=default_image_metrics(device_of(pipe)), negative_prompt=args.negative_prompt,
                              num_frames=args.num_frames,
                              images_per_prompt=images_per_prompt(args, prompts),
                              **diffusers_call_options(args, pipe))
    paths = write_comparison(images, Path(args.out) / "images", overwrite=args.force)
    for row in images.rows:
        print(f"{row['schedule']:>24}: PSNR to the teacher's images {row['psnr']:.4g} dB")
    if images.skipped:
        print(images.skipped)
    print(f"wrote {', '.join(p.name for p in paths)} to {Path(args.out) / 'images'}")
