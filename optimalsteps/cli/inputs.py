"""What the commands build from their arguments: models, noise, conditions, schedules, output arrays."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import OptimalStepsError
from ..core.io import load_npy, write_bytes
from ..core.models import draw_noise
from ..core.schedules import Schedule
from ..evaluation.baselines import make_schedule
from ..testbeds.registry import load_model


def load_model_from_args(args: argparse.Namespace) -> Any:
    return load_model(args.model)


def load_noise(path: str, model: Any) -> torch.Tensor:
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


def schedule_from_args(name_or_file: str, process: Any, steps: int | None) -> Schedule:
    path = Path(name_or_file)
    if name_or_file.endswith(".json") or path.is_file():
        schedule = Schedule.load(path)
        if steps is not None and steps != schedule.steps:
            schedule = schedule.interpolate(steps)
        return schedule
    if steps is None:
        raise OptimalStepsError(f"--steps is needed with the built-in schedule {name_or_file!r}")
    return make_schedule(name_or_file, process, steps)


def save_array(path: str, array: torch.Tensor, force: bool) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy())
    write_bytes(Path(path), buffer.getvalue(), force)


def search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) for search / compare: a diffusers pipeline or a plain model spec."""
    if args.model.startswith("diffusers:"):
        return diffusers_search_inputs(args)
    model = guided(load_model_from_args(args), args)
    noise = noise_from_args(args, model)
    cond = cond_from_args(args, model, noise.shape[0])
    return model, noise, cond, {}


def diffusers_search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) of --model diffusers:PATH_OR_ID with its prompts, guidance and resolution."""
    # imported only for diffusers: specs, so that the other commands never load the integration
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
