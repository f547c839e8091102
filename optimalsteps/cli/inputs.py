"""What the commands build from their arguments: models, noise, conditions, schedules, output arrays."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import as_noise, check_seed, check_steps_bound
from ..core.errors import OptimalStepsError
from ..core.io import load_npy, write_bytes
from ..core.models import draw_noise
from ..core.schedules import Schedule
from ..evaluation.baselines import make_schedule
from ..testbeds.registry import load_model


def load_model_from_args(args: argparse.Namespace) -> Any:
    return load_model(args.model)


def load_noise(path: str, model: Any) -> torch.Tensor:
    """A noise file as float32 [B, *sample_shape] (any float byte order or precision is read)."""
    return as_noise(load_npy(path, "noise file"), model, f"noise file {path}").to(torch.float32)


def noise_from_args(args: argparse.Namespace, model: Any, seed_offset: int = 0) -> torch.Tensor:
    if args.noise:
        noise = load_noise(args.noise, model)
        if "samples" in getattr(args, "given", ()) and args.samples != noise.shape[0]:
            raise OptimalStepsError(f"--samples {args.samples} disagrees with --noise {args.noise}, which holds "
                                    f"{noise.shape[0]} samples; give one of them")
        return noise
    return draw_noise(model, args.samples, check_seed(args.seed + seed_offset, "--seed"),
                      allow_huge=getattr(args, "allow_huge", False))


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


def schedule_from_args(name_or_file: str, process: Any, steps: int | None, allow_huge: bool = False) -> Schedule:
    path = Path(name_or_file)
    if path.is_dir():
        raise OptimalStepsError(f"--schedule {name_or_file} is a directory; give a schedule file or name")
    if steps is not None:
        check_steps_bound(steps, allow_huge, "--steps")
    if name_or_file.endswith(".json") or path.is_file():
        schedule = Schedule.load(path)
        check_steps_bound(schedule.steps, allow_huge, f"the {name_or_file} schedule's step count")
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
    refuse_diffusers_only(args)
    model = guided(load_model_from_args(args), args)
    noise = noise_from_args(args, model)
    cond = cond_from_args(args, model, noise.shape[0])
    return model, noise, cond, {}


DIFFUSERS_ONLY = ("prompt", "prompts_file", "negative_prompt", "height", "width", "num_frames", "image", "strength",
                  "mask")


def refuse_diffusers_only(args: argparse.Namespace) -> None:
    """Prompts and resolution apply only to a diffusers pipeline: say so instead of ignoring them."""
    given = [name for name in DIFFUSERS_ONLY if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise OptimalStepsError(f"{flags} appl{'y' if len(given) > 1 else 'ies'} only to --model diffusers:..., "
                                f"not to {args.model}")


def load_image(path: str, flag: str) -> Any:
    """An RGB PIL image from a PNG / JPG file, or a one-line error naming the flag."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise OptimalStepsError(f"{flag} needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise OptimalStepsError(f"cannot read {flag} {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def diffusers_call_options(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The pipeline call options of --image / --strength / --mask, under the names `pipe(...)` takes them."""
    options: dict[str, Any] = {}
    if getattr(args, "image", None) is not None:
        options["image"] = load_image(args.image, "--image")
    if getattr(args, "strength", None) is not None:
        options["strength"] = args.strength
    if getattr(args, "mask", None) is not None:
        from ..integrations.diffusers.common import call_parameters

        params = call_parameters(pipe)
        name = next((n for n in ("mask_image", "mask") if n in params), None)
        if name is None:
            raise OptimalStepsError(f"--mask: {type(pipe).__name__} takes no mask")
        options[name] = load_image(args.mask, "--mask").convert("L")
    return options


def diffusers_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(getattr(args, "prompt", None) or [])
    if getattr(args, "prompts_file", None):
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OptimalStepsError(f"cannot read --prompts-file {args.prompts_file}: {exc}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def images_per_prompt(args: argparse.Namespace, prompts: list[str]) -> int:
    """Images per prompt that give at least --samples latents in all."""
    return max(1, math.ceil(args.samples / len(prompts)))


def check_diffusers_args(args: argparse.Namespace) -> None:
    """Every diffusers argument checked that can be before the pipeline loads (the image files readable)."""
    if getattr(args, "noise", None):
        raise OptimalStepsError("--noise does not apply to a diffusers pipeline: it draws its latents from --seed")
    if getattr(args, "label", None) is not None:
        raise OptimalStepsError("--label does not apply to a diffusers pipeline: give DiT classes as --prompt")
    for flag in ("image", "mask"):
        if getattr(args, flag, None) is not None:
            load_image(getattr(args, flag), f"--{flag}")


def diffusers_inputs(args: argparse.Namespace, teacher_steps: int | None = None):
    """(pipe, model, noise, cond, metadata) of --model diffusers:PATH_OR_ID with its prompts, guidance,
    resolution and image inputs."""
    # imported only for diffusers: specs, so that the other commands never load the integration
    from ..integrations.diffusers.loading import load_pipeline, pipeline_model

    check_diffusers_args(args)
    spec = args.model[len("diffusers:"):]
    prompts = diffusers_prompts(args)
    if not prompts:
        raise OptimalStepsError("a diffusers model needs at least one --prompt (or --prompts-file)")
    pipe = load_pipeline(spec, getattr(args, "height", None), getattr(args, "width", None))
    model, noise, cond, metadata = pipeline_model(
        pipe, spec, prompts, getattr(args, "guidance", None), getattr(args, "height", None),
        getattr(args, "width", None), args.seed, args.samples, negative_prompt=getattr(args, "negative_prompt", None),
        num_frames=getattr(args, "num_frames", None), teacher_steps=teacher_steps, **diffusers_call_options(args, pipe))
    if getattr(args, "image", None) is not None:
        metadata["diffusers"]["image"] = str(args.image)
    if getattr(args, "mask", None) is not None:
        metadata["diffusers"]["mask"] = str(args.mask)
    return pipe, model, noise, cond, metadata


def diffusers_search_inputs(args: argparse.Namespace):
    """(model, noise, cond, metadata) of --model diffusers:PATH_OR_ID (see `diffusers_inputs`)."""
    return diffusers_inputs(args, getattr(args, "teacher_steps", None))[1:]


def check_high_steps(args: argparse.Namespace, steps: list[int]) -> None:
    """--high-steps checked before the model loads: a diffusers pipeline's, fewer than every step count."""
    high = getattr(args, "high_steps", None)
    if high is None:
        return
    if not args.model or not args.model.startswith("diffusers:"):
        raise OptimalStepsError(f"--high-steps applies only to a two-expert pipeline (--model diffusers:... of "
                                f"Wan 2.2), not to {args.model or 'a schedule without --model'}")
    too_few = [m for m in steps if high >= m]
    if too_few:
        raise OptimalStepsError(f"--high-steps {high} must be fewer than the step count ({too_few[0]}): the "
                                "low-noise expert needs at least one step")


def two_experts(args: argparse.Namespace, model: Any) -> bool:
    """Whether the loaded model is a two-expert pipeline's (Wan 2.2); --high-steps is refused on any other."""
    if getattr(model, "expert_split", None) is not None:
        return True
    if getattr(args, "high_steps", None) is not None:
        raise OptimalStepsError(f"--high-steps applies only to a two-expert pipeline (Wan 2.2 with transformer_2); "
                                f"{args.model} has one")
    return False
