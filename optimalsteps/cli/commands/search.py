"""`optimalsteps search`: search the optimal schedule (OSS dynamic programming)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ...core.errors import OptimalStepsError
from ...core.checks import check_distinct_paths, check_output_dir, check_output_file, check_steps_bound
from ...core.solvers import SOLVERS
from ...evaluation.baselines import make_schedule, oss_search
from ...optimize.checkpoint import clear_checkpoint
from ...optimize.distributed import backend_for
from ...optimize.dp import AGGREGATES, COSTS
from ...optimize.memory import format_bytes
from ...optimize.objectives import OBJECTIVES
from ...optimize.options import Checkpointing, DPOptions, Storage
from ...optimize.refine import Refinement
from ...optimize.search import estimated_method, memory_estimate
from ...optimize.select import METHODS, selection_table
from ..args import (add_diffusers_args, add_expert_args, add_model_args, add_noise_args, add_refine_args,
                    add_scale_args, positive_int)
from ..inputs import check_high_steps, search_inputs, two_experts


ESTIMATED = {"dp": "plain DP", "validated": "validated search", "beam": "beam DP"}


def add(sub: Any) -> None:
    p = sub.add_parser("search", help="search the optimal schedule (OSS dynamic programming)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)
    add_diffusers_args(p)
    add_expert_args(p)
    p.add_argument("--steps", type=positive_int, required=True, help="student steps M")
    p.add_argument("--teacher-steps", type=positive_int, default=200, help="teacher steps N (default 200)")
    p.add_argument("--teacher-schedule", default=None,
                   help="named teacher grid (default: uniform for flow/vp, karras for ve)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--cost", default="xt", choices=COSTS)
    p.add_argument("--aggregate", default=None, choices=AGGREGATES, help="joint (default) or median")
    p.add_argument("--reference-compat", action="store_true",
                   help="reproduce the released code's semantics (docs/search.md)")
    p.add_argument("--free-start", action="store_true",
                   help="let the first step start from the noise placed at a later grid point (docs/search.md)")
    p.add_argument("--max-batch", type=positive_int, default=4096, help="largest batch of one model call")
    p.add_argument("--out", required=True, help="schedule file to write (.json)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out (and, without --resume, start over in --checkpoint)")
    add_method_args(p)
    add_scale_args(p)
    add_refine_args(p)
    p.set_defaults(func=run)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what the search optimises (docs/search.md)")
    g.add_argument("--method", default=None, choices=METHODS,
                   help="validated (default: the best of many candidates on a validation set) or dp (the paper's "
                        "plain DP; the default when a plain-DP option such as --cost or --refine is given)")
    g.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="aggregation of the per-sample errors (default: log for validated, mse for dp)")
    # --width is the image width of the diffusers options
    g.add_argument("--beam-width", type=positive_int, default=None,
                   help="histories kept per DP cell (default: 4 for validated's beam candidate, 1 for dp)")


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True on the rank that writes output."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return not dist.is_initialized() or dist.get_rank() == 0


def refine_from_args(args: argparse.Namespace) -> Refinement | bool:
    """The refinement options of --refine (False without it)."""
    if not args.refine and (args.refine_budget is not None or args.refine_samples is not None
                            or args.refine_objective is not None):
        raise OptimalStepsError("--refine-budget, --refine-samples and --refine-objective need --refine")
    if args.coarse_steps is not None and not args.coarse_to_fine:
        raise OptimalStepsError("--coarse-steps needs --coarse-to-fine")
    return Refinement(samples=args.refine_samples, seed=args.seed, method=args.refine_method,
                      objective=args.refine_objective or "mse", warn=False) if args.refine else False


def check_outputs(args: argparse.Namespace) -> None:
    """Every path the search writes, checked before the model is loaded; --force without --resume clears
    an old checkpoint."""
    check_output_file(args.out, args.force)
    check_distinct_paths({"--out": args.out, "--checkpoint": args.checkpoint, "--storage-dir": args.storage_dir,
                          "--noise": args.noise})
    check_steps_bound(args.teacher_steps, args.allow_huge, "--teacher-steps")
    if args.storage_dir is not None and args.storage != "disk":
        raise OptimalStepsError("--storage-dir applies only to --storage disk")
    for flag, folder in (("--checkpoint", args.checkpoint), ("--storage-dir", args.storage_dir)):
        if folder is not None:
            check_output_dir(folder, [], True, flag)
    if args.checkpoint and args.force and not args.resume:
        clear_checkpoint(args.checkpoint)


def run(args: argparse.Namespace) -> None:
    try:
        _search(args)
        if dist.is_initialized():
            # every rank leaves together: a rank that exits while another still holds the group's connections
            # can make gloo abort the process (SIGABRT) after the work is done
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _search(args: argparse.Namespace) -> None:
    refine = refine_from_args(args)
    dp, checkpointing = DPOptions.from_args(args), Checkpointing.from_args(args)
    check_outputs(args)
    check_high_steps(args, [args.steps])
    model, noise, cond, metadata = search_inputs(args)
    teacher_grid = make_schedule(args.teacher_schedule, model.process, args.teacher_steps) if args.teacher_schedule \
        else None  # None: the model's own grid (a diffusers pipeline's shifted / trained-range one) or the default
    main_rank = init_distributed(noise.device)
    storage = Storage.from_args(args)
    method = args.method or ("dp" if refine else None)  # refinement starts from the plain DP
    estimate = memory_estimate(noise, args.teacher_steps, args.solver, dp, storage, steps=args.steps, method=method,
                               checkpointing=checkpointing, model=model)
    if main_rank:
        what = ESTIMATED[estimated_method(noise, dp, storage, args.solver, method, checkpointing)]
        print(f"peak memory estimate ({what}): "
              + ", ".join(f"{place} {format_bytes(n)}" for place, n in estimate.items() if n))
    options = dict(dp=dp, storage=replace(storage, estimate=estimate), checkpointing=checkpointing, progress=True,
                   seed=args.seed, method=method)
    experts = None
    if two_experts(args, model):  # Wan 2.2: one step exactly on the experts' boundary
        experts = search_two_experts(model, noise, args, cond, teacher_grid, refine, options)
        result = experts.result
    else:
        result = oss_search(model, noise, args.steps, args.teacher_steps, args.solver, cond, teacher_grid=teacher_grid,
                            refine=refine, refine_budget=args.refine_budget, **options)
    if not main_rank:  # under torchrun only rank 0 writes and reports
        return
    result.schedule.metadata.update(metadata)
    result.schedule.save(args.out, overwrite=args.force)
    report(result, args.solver)
    if experts is not None:
        print(f"experts: steps 1-{experts.split_step} on transformer (down to the boundary {experts.boundary:g}), "
              f"steps {experts.split_step + 1}-{result.schedule.steps} on transformer_2")
    print(f"wrote {args.out}")


def search_two_experts(model: Any, noise: torch.Tensor, args: argparse.Namespace, cond: Any, teacher_grid: Any,
                       refine: Any, options: dict) -> Any:
    """The two-expert search of a Wan 2.2 pipeline (integrations/diffusers/experts.py)."""
    from ...integrations.diffusers.experts import search_experts

    if refine:
        raise OptimalStepsError("--refine moves the times off the teacher grid, the experts' boundary with them: "
                                "not with a two-expert pipeline")
    teacher = teacher_grid if teacher_grid is not None else model.teacher_grid(args.teacher_steps)
    return search_experts(model, noise, args.steps, teacher, cond, args.solver, args.high_steps, **options)


def report(result: Any, solver: str) -> None:
    schedule = result.schedule
    metadata = schedule.metadata
    print(f"schedule ({schedule.steps} steps, {solver}): " + ", ".join(f"{v:.4g}" for v in schedule.times.tolist()))
    if metadata.get("winner"):
        print(f"winner: {metadata['winner']} of {len(metadata['selection'])} candidates, scored on "
              f"{metadata['validation_samples']} validation samples (NFE {metadata['nfe']}, plain DP "
              f"{metadata['plain_dp_nfe']})")
        print(selection_table(schedule))
    else:
        print(f"teacher indices: {result.indices} of {metadata['teacher_steps']}")
        what = f"{metadata['cost']}, {metadata['aggregate']}" if "cost" in metadata else f"{metadata['objective']}"
        print(f"DP cost ({what}): {result.dp_cost:.4g}   error of the schedule on the search samples: "
              f"{result.error:.4g}   NFE: {result.nfe}   time: {result.seconds:.1f}s")
    print_refinement(schedule)


def print_refinement(schedule: Any) -> None:
    """The refinement's outcome (or why it was refused) and the coarse-to-fine levels, one line each."""
    metadata = schedule.metadata
    if metadata.get("coarse_to_fine"):
        fast = metadata["coarse_to_fine"]
        print(f"coarse to fine: coarse grid of {fast['coarse_steps']} steps, then "
              + ", ".join(f"stride {lv['stride']} (±{lv['window']}, {lv['rounds']} round(s))" for lv in fast["levels"]))
    refine = metadata.get("refine")
    if not refine:
        return
    if refine.get("message"):
        print(f"refinement skipped: {refine['message']}")
        return
    print(f"refined from {refine['start']}: final error ({refine.get('objective', 'mse')}) on {refine['samples']} "
          f"samples {refine['error_unrefined']:.4g} (DP) -> {refine['error_refined']:.4g} ({refine['evaluations']} evaluations, "
          f"stopped: {refine['stopped']})   NFE: search {metadata['search_nfe']}, refinement {metadata['refine_nfe']}")
