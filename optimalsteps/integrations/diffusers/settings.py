"""Sizes, guidance and the settings a schedule records: what a call runs at, checked against what the
pipeline and its network can take, and the one warning when a schedule runs under other settings."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from ...core.errors import OptimalStepsError
from ...core.schedules import Schedule
from .common import SettingsWarning, call_default, close
from .family import Family, whole_number


def check_size(cls: str, rules: dict[str, Optional[int]], h: Any, w: Any) -> tuple[int, int]:
    for name, value in (("height", h), ("width", w)):
        if not whole_number(value) or value < 1:
            raise OptimalStepsError(f"{name} must be a whole number of pixels >= 1, got {value!r}")
    h, w = int(h), int(w)
    fixed = rules.get("fixed")
    if fixed is not None:
        if (h, w) != (fixed, fixed):
            raise OptimalStepsError(f"{cls} generates {fixed}x{fixed} only, got {h}x{w}")
        return h, w
    multiple = rules["multiple"]
    if h % multiple or w % multiple:
        raise OptimalStepsError(f"{cls} needs height and width divisible by {multiple}, got {h}x{w}")
    limit = rules.get("limit")
    if limit is not None and max(h, w) // rules["patch_pixels"] > limit:
        raise OptimalStepsError(f"{h}x{w} is {max(h, w) // rules['patch_pixels']} patches across; the "
                                f"transformer takes at most {limit}")
    return h, w


def resolution(pipe: Any, family: Family, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """The pixel resolution a call runs at, checked against what the pipeline and its network can take."""
    default_h, default_w = family.default_size(pipe)
    rules = family.size_rules(family.vae_scale_factor(pipe), family.net(pipe).config)
    return check_size(type(pipe).__name__, rules, default_h if height is None else height,
                      default_w if width is None else width)


def guidance_scale(pipe: Any, value: Optional[float]) -> float:
    scale = call_default(pipe, "guidance_scale") if value is None else value
    if scale is None:
        scale = 1.0  # pipelines whose guidance_scale defaults to None (QwenImage) run without it
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise OptimalStepsError(f"guidance scale must be a number, got {value!r}") from None
    if not math.isfinite(scale):
        raise OptimalStepsError(f"guidance scale must be finite, got {scale}")
    return scale


def model_id(pipe: Any) -> Optional[str]:
    return getattr(pipe, "name_or_path", None) or None


def current_settings(pipe: Any, family: Family, height: int, width: int, guidance: Optional[float],
                     num_frames: Optional[int] = None, steps: Optional[int] = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"pipeline": type(pipe).__name__, "model_id": model_id(pipe),
                                "height": height, "width": width}
    if family.flow:
        info = family.shift(pipe, height, width, steps, num_frames)[1]
        # where mu follows the step count (Flux 2) it is no setting of its own: the schedule's steps fix it
        skip = ("mu", "mu_steps") if family.steps_set_mu else ()
        settings.update({k: v for k, v in info.items() if k not in skip})
    if guidance is not None:
        settings["guidance_scale"] = float(guidance)
    if num_frames is not None:
        settings["num_frames"] = num_frames
    return settings


def warn_settings(schedule: Schedule, current: dict[str, Any], solver: Optional[str], runner: str) -> None:
    """One warning listing every setting that differs from those the schedule was searched under."""
    recorded = schedule.metadata.get("diffusers") or {}
    diffs = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in current.items()
             if key in recorded and recorded[key] is not None and value is not None
             and not close(recorded[key], value)]
    if diffs:
        warnings.warn("the schedule was searched under other settings (" + "; ".join(diffs) +
                      "): it may not be optimal for these", SettingsWarning, stacklevel=3)
    if schedule.solver and solver != schedule.solver:
        warnings.warn(f"the schedule was searched for {schedule.solver} but {runner} runs "
                      f"{solver or 'its own solver'}; sample_pipeline(..., solver={schedule.solver!r}) runs it as "
                      "searched", SettingsWarning, stacklevel=3)
