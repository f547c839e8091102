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
from typing import Any, Callable

import numpy as np
import torch

from .errors import OptimalStepsError

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
    from .models import load_model

    return load_model(args.model)


def load_noise(path: str, model: Any) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise OptimalStepsError(f"noise file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise OptimalStepsError(f"noise file {path} is not a readable .npy array: {exc}") from None
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
    from .models import draw_noise

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
    from .schedules import Schedule

    path = Path(name_or_file)
    if name_or_file.endswith(".json") or path.is_file():
        schedule = Schedule.load(path)
        if steps is not None and steps != schedule.steps:
            schedule = schedule.interpolate(steps)
        return schedule
    from .baselines import make_schedule

    if steps is None:
        raise OptimalStepsError(f"--steps is needed with the built-in schedule {name_or_file!r}")
    return make_schedule(name_or_file, process, steps)


def save_array(path: str, array: torch.Tensor, force: bool) -> None:
    from .schedules import write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy())
    write_bytes(Path(path), buffer.getvalue(), force)


# ---------------------------------------------------------------------------------- commands

def cmd_sample(args: argparse.Namespace) -> None:
    from .solvers import sample

    from .schedules import check_writable

    check_writable(args.out, args.force)
    model = guided(load_model_from_args(args), args)
    schedule = schedule_from_args(args.schedule, model.process, args.steps)
    calibration = None
    if args.calibrate:
        from .calibration import AmplitudeCalibration

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


def cmd_schedule(args: argparse.Namespace) -> None:
    from .baselines import make_schedule
    from .processes import get_process

    process = get_process(args.process)
    schedule = make_schedule(args.name, process, args.steps)
    if args.out:
        schedule.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(schedule.to_dict(), indent=2))


def cmd_search(args: argparse.Namespace) -> None:
    from .schedules import check_writable
    from .search import search

    check_writable(args.out, args.force)
    model, noise, cond, metadata = search_inputs(args)
    teacher = None
    if args.teacher_schedule:
        from .baselines import make_schedule

        teacher = make_schedule(args.teacher_schedule, model.process, args.teacher_steps)
    result = search(model, noise, steps=args.steps, teacher_steps=args.teacher_steps, solver=args.solver,
                    teacher_schedule=teacher, cond=cond, cost=args.cost, aggregate=args.aggregate,
                    reference_compat=args.reference_compat, max_batch=args.max_batch, progress=True, seed=args.seed)
    result.schedule.metadata.update(metadata)
    result.schedule.save(args.out, overwrite=args.force)
    schedule = result.schedule
    print(f"schedule ({schedule.steps} steps, {args.solver}): " + ", ".join(f"{v:.4g}" for v in schedule.times.tolist()))
    print(f"teacher indices: {result.indices} of {schedule.metadata['teacher_steps']}")
    print(f"cost ({schedule.metadata['cost']}, {schedule.metadata['aggregate']}): {result.cost:.4g}   "
          f"NFE: {result.nfe}   time: {result.seconds:.1f}s")
    print(f"wrote {args.out}")


def search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) for search / compare: a diffusers pipeline or a plain model spec."""
    if args.model.startswith("diffusers:"):
        from .diffusers import load_diffusers_model

        return load_diffusers_model(args)
    model = guided(load_model_from_args(args), args)
    noise = noise_from_args(args, model)
    cond = cond_from_args(args, model, noise.shape[0])
    return model, noise, cond, {}


def add_search_command(sub: Any) -> None:
    from .search import AGGREGATES, COSTS
    from .solvers import SOLVERS

    p = sub.add_parser("search", help="search the optimal schedule (OSS dynamic programming)")
    add_model_args(p)
    add_noise_args(p, samples_default=8)
    p.add_argument("--steps", type=_positive_int, required=True, help="student steps M")
    p.add_argument("--teacher-steps", type=_positive_int, default=200, help="teacher steps N (default 200)")
    p.add_argument("--teacher-schedule", default=None,
                   help="named teacher grid (default: uniform for flow/vp, karras for ve)")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--cost", default="xt", choices=COSTS)
    p.add_argument("--aggregate", default="joint", choices=AGGREGATES)
    p.add_argument("--reference-compat", action="store_true",
                   help="reproduce the released code's semantics (docs/search.md)")
    p.add_argument("--max-batch", type=_positive_int, default=4096, help="largest batch of one model call")
    p.add_argument("--out", required=True, help="schedule file to write (.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_search)


def cmd_models(args: argparse.Namespace) -> None:
    from .models import _builtin_models

    print("gmm:dim=64,components=8,seed=0,process=flow   exact Gaussian mixture (random, any dim/process)")
    print("gmm:FILE.json                                 exact Gaussian mixture from a file")
    print("empirical:digits|mnist[,process=flow]         exact denoiser of a finite dataset")
    print("python:FILE.py:NAME                           NAME() in a user file returns a model")
    print("diffusers:PATH_OR_ID                          a diffusers pipeline (search / compare)")
    for name, (description, _) in sorted(_builtin_models().items()):
        print(f"{name:<46}{description}")


def build_parser() -> argparse.ArgumentParser:
    from .solvers import SOLVERS

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

    p = sub.add_parser("schedule", help="print or write a built-in schedule")
    p.add_argument("name")
    p.add_argument("--process", default="flow")
    p.add_argument("--steps", type=_positive_int, required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("models", help="list the model specs")
    p.set_defaults(func=cmd_models)

    add_search_command(sub)
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
