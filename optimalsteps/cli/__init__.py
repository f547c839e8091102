"""The `optimalsteps` command: a thin shell over the Python API.

Every subcommand is a function `cmd_NAME(args)`; bad input raises OptimalStepsError, which `main`
prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import OptimalStepsError

DEFAULT_MODEL = "gmm:dim=64,components=8,seed=0,process=flow"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise OptimalStepsError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


# ---------------------------------------------------------------------------------- shared pieces

def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model spec (default {DEFAULT_MODEL}; `optimalsteps models` lists them)")
    parser.add_argument("--label", type=int, default=None,
                        help="class label for a class-conditional model (default: labels cycle over classes)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")


def add_noise_args(parser: argparse.ArgumentParser, samples_default: int) -> None:
    parser.add_argument("--samples", type=_positive_int, default=samples_default, help="number of noise samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--noise", default=None, help="a .npy array [B, ...] of standard normal noise to use")


def load_model_from_args(args: argparse.Namespace) -> Any:
    from ..core.models import load_model

    return load_model(args.model)


def load_noise(path: str, model: Any) -> torch.Tensor:
    from ..core.models import load_npy

    array = load_npy(path, "noise file")
    if not np.issubdtype(array.dtype, np.floating):
        raise OptimalStepsError(f"noise file {path} must hold floating-point values, got {array.dtype}")
    shape = getattr(model, "sample_shape", None)
    if array.ndim < 2 or array.shape[0] < 1 or (shape is not None and tuple(array.shape[1:]) != tuple(shape)):
        want = f"[B, {', '.join(str(s) for s in shape)}]" if shape is not None else "[B, ...]"
        raise OptimalStepsError(f"noise file {path} has shape {list(array.shape)}, expected {want}")
    if not np.isfinite(array).all():
        raise OptimalStepsError(f"noise file {path} contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)


def noise_from_args(args: argparse.Namespace, model: Any, seed_offset: int = 0) -> torch.Tensor:
    from ..core.models import draw_noise

    if args.noise:
        return load_noise(args.noise, model)
    return draw_noise(model, args.samples, args.seed + seed_offset)


def cond_from_args(args: argparse.Namespace, model: Any, count: int) -> dict | None:
    """Per-sample conditions for a class-conditional model (labels), or None."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        if args.label is not None:
            raise OptimalStepsError("--label given but the model is not class-conditional")
        return None
    if args.label is not None:
        if not 0 <= args.label < num_classes:
            raise OptimalStepsError(f"--label {args.label} is out of range for a model with {num_classes} classes")
        labels = torch.full((count,), args.label, dtype=torch.long)
    else:
        labels = torch.arange(count, dtype=torch.long) % num_classes
    return {"labels": labels}


def guided(model: Any, args: argparse.Namespace) -> Any:
    if args.guidance is None:
        return model
    wrap = getattr(model, "with_guidance", None)
    if wrap is None:
        raise OptimalStepsError("--guidance given but the model has no classifier-free guidance")
    return wrap(args.guidance)


def schedule_from_args(name_or_file: str, process: Any, steps: int | None) -> Any:
    from ..core.schedules import Schedule

    path = Path(name_or_file)
    if name_or_file.endswith(".json") or path.is_file():
        schedule = Schedule.load(path)
        if steps is not None and steps != schedule.steps:
            schedule = schedule.interpolate(steps)
        return schedule
    from ..evaluation.baselines import make_schedule

    if steps is None:
        raise OptimalStepsError(f"--steps is needed with the built-in schedule {name_or_file!r}")
    return make_schedule(name_or_file, process, steps)


def save_array(path: str, array: torch.Tensor, force: bool) -> None:
    from ..core.schedules import write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy())
    write_bytes(Path(path), buffer.getvalue(), force)


# ---------------------------------------------------------------------------------- commands

def cmd_sample(args: argparse.Namespace) -> None:
    from ..core.solvers import sample

    from ..core.schedules import check_writable

    check_writable(args.out, args.force)
    model = guided(load_model_from_args(args), args)
    schedule = schedule_from_args(args.schedule, model.process, args.steps)
    calibration = None
    if args.calibrate:
        from ..optimize.calibration import AmplitudeCalibration

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


def _option_value(text: str) -> Any:
    """A --option value: a number, true/false, none, or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return None if lowered in ("none", "null") else text


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs into keyword options (dashes in keys become underscores)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptimalStepsError(f"{flag} {pair!r} is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return options


def cmd_schedule(args: argparse.Namespace) -> None:
    from ..evaluation.baselines import describe, make_schedule, schedule_names
    from ..core.schedules import check_writable, parse_process

    if args.name == "list":
        for name in schedule_names():
            print(f"{name:<12}{describe(name)}")
        return
    if args.steps is None:
        raise OptimalStepsError("--steps is required")
    check_writable(args.out, args.force)
    options = parse_options(args.option)
    if args.family:
        options["family"] = args.family
    process = parse_process(args.process) if args.process else None
    model = noise = cond = None
    metadata: dict[str, Any] = {}
    if args.model:
        model, noise, cond, metadata = search_inputs(args)
    elif process is None:
        process = parse_process("flow")
    schedule = make_schedule(args.name, process, args.steps, model=model, noise=noise, cond=cond,
                             solver=args.solver, progress=model is not None, **options)
    schedule.metadata.update(metadata)
    if args.out:
        schedule.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(schedule.to_dict(), indent=2))


def add_schedule_command(sub: Any) -> None:
    from ..core.solvers import SOLVERS

    p = sub.add_parser("schedule", help="print or write a named schedule (`optimalsteps schedule list` names them)")
    p.add_argument("name", help="a schedule name, or `list`")
    p.add_argument("--process", default=None, help="flow, vp, ve or ve(sigma_max=S) (default: the model's, else flow)")
    p.add_argument("--steps", type=_positive_int, default=None)
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
    p.add_argument("--out", default=None, help="write the schedule to this .json file (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_schedule)


def cmd_compare(args: argparse.Namespace) -> None:
    from ..evaluation.compare import compare, report_paths, write_report
    from ..core.schedules import check_writable

    for path in report_paths(args.out):
        check_writable(path, args.force)
    options: dict[str, dict[str, Any]] = {}
    for pair in args.option:
        name, dot, rest = pair.partition(".")
        if not dot:
            raise OptimalStepsError(f"--option {pair!r} is not NAME.KEY=VALUE (e.g. shift.mu=1.15)")
        options.setdefault(name, {}).update(parse_options([rest]))
    model, noise, cond, metadata = search_inputs(args)
    eval_cond = None
    if cond and getattr(model, "num_classes", None) is not None and not args.model.startswith("diffusers:"):
        eval_cond = cond_from_args(args, model, args.eval_samples)
    elif cond and args.model.startswith("diffusers:"):  # the encoded prompts, cycled over the evaluation samples
        from ..core.models import index_cond

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


def add_compare_command(sub: Any) -> None:
    from ..evaluation.compare import DEFAULT_SCHEDULES
    from ..core.solvers import SOLVERS

    p = sub.add_parser("compare", help="compare schedules against the teacher on fresh noise (tables and plots)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)  # the search noise
    add_diffusers_args(p)
    p.add_argument("--steps", type=_int_list, default=[3, 5, 8, 10], help="step counts (default 3,5,8,10)")
    p.add_argument("--solvers", type=_name_list, default=["euler", "dpmpp2m"],
                   help=f"comma-separated, from {', '.join(sorted(SOLVERS))} (default euler,dpmpp2m)")
    p.add_argument("--schedules", type=_name_list, default=list(DEFAULT_SCHEDULES),
                   help=f"comma-separated names (default {','.join(DEFAULT_SCHEDULES)}; `optimalsteps schedule list`)")
    p.add_argument("--eval-samples", type=_positive_int, default=512, help="fresh evaluation samples (default 512)")
    p.add_argument("--eval-seed", type=int, default=None, help="seed of the evaluation noise (default seed + 1000003)")
    p.add_argument("--teacher-steps", type=_positive_int, default=200, help="teacher steps N (default 200)")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="an option of one schedule, e.g. shift.mu=1.15 or oss.cost=x0 (repeatable)")
    p.add_argument("--max-batch", type=_positive_int, default=4096, help="largest batch of one model call")
    p.add_argument("--out", required=True, help="directory for results.json/.csv/.md and plots")
    p.add_argument("--force", action="store_true", help="overwrite existing result files")
    p.set_defaults(func=cmd_compare)


def cmd_search(args: argparse.Namespace) -> None:
    from ..optimize.memory import format_bytes
    from ..core.schedules import check_writable
    from ..optimize.search import memory_estimate, search

    check_writable(args.out, args.force)
    if args.resume and not args.checkpoint:
        raise OptimalStepsError("--resume needs the --checkpoint directory of the search to continue")
    model, noise, cond, metadata = search_inputs(args)
    teacher = None
    if args.teacher_schedule:
        from ..evaluation.baselines import make_schedule

        teacher = make_schedule(args.teacher_schedule, model.process, args.teacher_steps)
    elif hasattr(model, "teacher_schedule"):  # a diffusers pipeline: its own shifted / trained-range grid
        teacher = model.teacher_schedule(args.teacher_steps)
    main_rank = init_distributed(noise.device)
    estimate = memory_estimate(noise, args.teacher_steps, args.solver, args.cost, args.storage, args.storage_dtype,
                               args.target_chunk)
    if main_rank:
        print("peak memory estimate: " + ", ".join(f"{place} {format_bytes(n)}" for place, n in estimate.items() if n))
    result = search(model, noise, steps=args.steps, teacher_steps=args.teacher_steps, solver=args.solver,
                    teacher_schedule=teacher, cond=cond, cost=args.cost, aggregate=args.aggregate,
                    reference_compat=args.reference_compat, max_batch=args.max_batch, progress=True, seed=args.seed,
                    storage=args.storage, storage_dtype=args.storage_dtype, storage_dir=args.storage_dir,
                    target_chunk=args.target_chunk, memory_limit=args.memory_limit,
                    checkpoint_dir=args.checkpoint, resume=args.resume, free_start=args.free_start,
                    **method_from_args(args), **refine_from_args(args))
    if not main_rank:  # under torchrun only rank 0 writes and reports
        return
    result.schedule.metadata.update(metadata)
    result.schedule.save(args.out, overwrite=args.force)
    schedule = result.schedule
    print(f"schedule ({schedule.steps} steps, {args.solver}): " + ", ".join(f"{v:.4g}" for v in schedule.times.tolist()))
    print(f"teacher indices: {result.indices} of {schedule.metadata['teacher_steps']}")
    if "cost" in schedule.metadata:
        print(f"cost ({schedule.metadata['cost']}, {schedule.metadata['aggregate']}): {result.cost:.4g}   "
              f"NFE: {result.nfe}   time: {result.seconds:.1f}s")
    else:
        print(f"{schedule.metadata['selection_method']} ({schedule.metadata['objective']} objective): "
              f"{result.cost:.4g}   NFE: {result.nfe}   time: {result.seconds:.1f}s")
    print_selection(schedule)
    print_refinement(schedule)
    print(f"wrote {args.out}")


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True on the rank that writes output."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from ..optimize.distributed import backend_for

        dist.init_process_group(backend_for(device))
    return not dist.is_initialized() or dist.get_rank() == 0


def _bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number = text.strip().lower().rstrip("bitkmg")
    unit = text.strip().lower()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 8GiB or 512MiB, got {text!r}") from None
    return int(value)


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    from ..optimize.memory import STORAGE_DTYPES, STORAGES

    group = parser.add_argument_group("scale (docs/scale.md)")
    group.add_argument("--storage", default="memory", choices=STORAGES,
                       help="where the teacher trajectory lives: the compute device, host memory, or a file")
    group.add_argument("--storage-dir", default=None, help="directory of the memory-mapped trajectory (--storage disk)")
    group.add_argument("--storage-dtype", default=None, choices=sorted(STORAGE_DTYPES),
                       help="precision of the stored trajectory (costs are computed in float32 or better)")
    group.add_argument("--target-chunk", type=_positive_int, default=None,
                       help="targets per cost chunk (bounds per-layer temporaries)")
    group.add_argument("--memory-limit", type=_bytes, default=None,
                       help="refuse a search estimated to need more than this (default: what is free)")
    group.add_argument("--checkpoint", default=None, help="directory of checkpoints after the teacher and each layer")
    group.add_argument("--resume", action="store_true", help="continue the search in --checkpoint")


def search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) for search / compare: a diffusers pipeline or a plain model spec."""
    if args.model.startswith("diffusers:"):
        return diffusers_search_inputs(args)
    model = guided(load_model_from_args(args), args)
    noise = noise_from_args(args, model)
    cond = cond_from_args(args, model, noise.shape[0])
    return model, noise, cond, {}


def add_diffusers_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("diffusers pipelines",
                                      "--model diffusers:PATH_OR_ID[,dtype=bfloat16][,device=cuda]")
    group.add_argument("--prompt", action="append", default=None,
                       help="a prompt (repeatable; DiT: a class id or label); --samples latents are spread over them")
    group.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    group.add_argument("--negative-prompt", default=None, help="the negative prompt of classifier-free guidance")
    group.add_argument("--height", type=_positive_int, default=None, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=_positive_int, default=None, help="image width (default: the pipeline's)")


def diffusers_search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) of --model diffusers:PATH_OR_ID with its prompts, guidance and resolution."""
    from ..integrations.diffusers import load_diffusers_model

    if getattr(args, "noise", None):
        raise OptimalStepsError("--noise does not apply to a diffusers pipeline: it draws its latents from --seed")
    if getattr(args, "label", None) is not None:
        raise OptimalStepsError("--label does not apply to a diffusers pipeline: give DiT classes as --prompt")
    prompts = list(getattr(args, "prompt", None) or [])
    if getattr(args, "prompts_file", None):
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OptimalStepsError(f"cannot read --prompts-file {args.prompts_file}: {exc}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    return load_diffusers_model(args.model[len("diffusers:"):], prompts, getattr(args, "guidance", None),
                                getattr(args, "height", None), getattr(args, "width", None), args.seed, args.samples,
                                negative_prompt=getattr(args, "negative_prompt", None))


def add_search_command(sub: Any) -> None:
    from ..optimize.search import AGGREGATES, COSTS
    from ..core.solvers import SOLVERS

    p = sub.add_parser("search", help="search the optimal schedule (OSS dynamic programming)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)
    add_diffusers_args(p)
    p.add_argument("--steps", type=_positive_int, required=True, help="student steps M")
    p.add_argument("--teacher-steps", type=_positive_int, default=200, help="teacher steps N (default 200)")
    p.add_argument("--teacher-schedule", default=None,
                   help="named teacher grid (default: uniform for flow/vp, karras for ve)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--cost", default="xt", choices=COSTS)
    p.add_argument("--aggregate", default="joint", choices=AGGREGATES)
    p.add_argument("--reference-compat", action="store_true",
                   help="reproduce the released code's semantics (docs/search.md)")
    p.add_argument("--free-start", action="store_true",
                   help="let the first step start from the noise placed at a later grid point (docs/search.md)")
    p.add_argument("--max-batch", type=_positive_int, default=4096, help="largest batch of one model call")
    add_method_args(p)
    p.add_argument("--out", required=True, help="schedule file to write (.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    add_scale_args(p)
    add_refine_args(p)
    p.set_defaults(func=cmd_search)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    from ..optimize.objectives import OBJECTIVES
    from ..optimize.select import METHODS as SEARCH_METHODS

    g = parser.add_argument_group("what the search optimises (docs/search.md)")
    g.add_argument("--method", default=None, choices=SEARCH_METHODS,
                   help="validated (default: the best of many candidates on a validation set) or dp (the paper's "
                        "plain DP; the default when a plain-DP option such as --cost or --refine is given)")
    g.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="aggregation of the per-sample errors (default: log for validated, mse for dp)")
    # --width is the image width of the diffusers options
    g.add_argument("--beam-width", type=_positive_int, default=None,
                   help="histories kept per DP cell (default: 4 for validated's beam candidate, 1 for dp)")


# the plain DP's own options: given any of them, --method defaults to dp
_DP_FLAGS = {"reference_compat": False, "cost": "xt", "aggregate": "joint", "free_start": False, "refine": False,
             "coarse_to_fine": False, "storage": "memory", "storage_dtype": None, "target_chunk": None,
             "checkpoint": None, "memory_limit": None}


def method_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """search() keywords of --method, --objective, --width."""
    method = args.method
    if method is None:
        given = [k for k, default in _DP_FLAGS.items() if getattr(args, k, default) != default]
        method = "dp" if given else "validated"
    return {"method": method, "objective": args.objective, "width": args.beam_width}


def print_selection(schedule: Any) -> None:
    """The validated search's candidates and their validation scores."""
    from ..optimize.select import selection_table

    table = selection_table(schedule)
    if table:
        print(f"winner: {schedule.metadata['winner']} of {len(schedule.metadata['selection'])} candidates, scored on "
              f"{schedule.metadata['validation_samples']} validation samples (NFE {schedule.metadata['nfe']}, "
              f"plain DP {schedule.metadata['plain_dp_nfe']})")
        print(table)


def add_refine_args(parser: argparse.ArgumentParser) -> None:
    from ..optimize.refine import METHODS

    g = parser.add_argument_group("refinement and coarse-to-fine search (docs/refine.md)")
    g.add_argument("--refine", action="store_true",
                   help="then optimise the times off the grid for the final error on the search samples")
    g.add_argument("--refine-budget", type=_positive_int, default=None,
                   help="most model calls the refinement may spend (default: until converged, 40 per time)")
    g.add_argument("--refine-samples", type=_positive_int, default=None,
                   help="measure the final error on this many samples (extra ones get their own teacher run)")
    g.add_argument("--refine-method", default="nelder-mead", choices=METHODS)
    g.add_argument("--coarse-to-fine", action="store_true",
                   help="DP on a coarse sub-grid, then on bands around its choices: far fewer model calls")
    g.add_argument("--coarse-steps", type=_positive_int, default=None,
                   help="steps of the coarse grid (default: max(2 M, N / 16))")


def refine_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """search() keyword arguments of the refinement and coarse-to-fine options."""
    from ..optimize.refine import CoarseToFine, Refinement

    if not args.refine and (args.refine_budget is not None or args.refine_samples is not None):
        raise OptimalStepsError("--refine-budget and --refine-samples need --refine")
    if args.coarse_steps is not None and not args.coarse_to_fine:
        raise OptimalStepsError("--coarse-steps needs --coarse-to-fine")
    refine = Refinement(samples=args.refine_samples, seed=args.seed, method=args.refine_method, warn=False)
    return {"refine": refine if args.refine else False, "refine_budget": args.refine_budget,
            "coarse_to_fine": CoarseToFine(args.coarse_steps) if args.coarse_to_fine else False}


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
    print(f"refined from {refine['start']}: final error on {refine['samples']} samples "
          f"{refine['error_unrefined']:.4g} (DP) -> {refine['error_refined']:.4g} ({refine['evaluations']} evaluations, "
          f"stopped: {refine['stopped']})   NFE: search {metadata['search_nfe']}, refinement {metadata['refine_nfe']}")


def cmd_models(args: argparse.Namespace) -> None:
    from ..core.models import _builtin_models

    print("gmm:dim=64,components=8,seed=0,process=flow   exact Gaussian mixture (random, any dim/process)")
    print("gmm:FILE.json                                 exact Gaussian mixture from a file")
    print("empirical:digits|mnist[,process=flow]         exact denoiser of a finite dataset")
    print("python:FILE.py:NAME                           NAME() in a user file returns a model")
    print("diffusers:PATH_OR_ID                          a diffusers pipeline (search / compare)")
    for name, (description, _) in sorted(_builtin_models().items()):
        print(f"{name:<46}{description}")


def build_parser() -> argparse.ArgumentParser:
    from ..core.solvers import SOLVERS

    parser = _Parser(prog="optimalsteps", description="Optimal few-step schedules for diffusion and flow models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("sample", help="sample a model on a schedule")
    add_model_args(p)
    add_noise_args(p, samples_default=16)
    p.add_argument("--schedule", default="uniform", help="a schedule file (.json) or a built-in name")
    p.add_argument("--steps", type=_positive_int, default=None, help="number of steps (default 10 for a name)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--calibrate", default=None, choices=["scale", "affine"],
                   help="amplitude calibration from a searched schedule's statistics (off by default)")
    p.add_argument("--out", default=None, help="write the final samples to this .npy file")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=cmd_sample)

    add_schedule_command(sub)

    p = sub.add_parser("models", help="list the model specs")
    p.set_defaults(func=cmd_models)

    add_search_command(sub)
    add_compare_command(sub)
    from ..evaluation.demo import add_demo_command

    add_demo_command(sub)
    # further subcommands: one add_*_command(sub) function each, below
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        if getattr(args, "command", None) == "sample" and args.steps is None and not args.schedule.endswith(".json"):
            args.steps = 10
        args.func(args)
        return 0
    except OptimalStepsError as exc:
        print(f"optimalsteps: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optimalsteps: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
