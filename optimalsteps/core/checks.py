"""Argument checks at the public entry points: each raises OptimalStepsError with one sentence naming
the argument and what is wrong, before any model call.

Bounds: a request whose estimated memory exceeds what the machine has is refused; one that is merely
huge (more than `MAX_STEPS` steps, or more than `MAX_SAMPLES` samples) needs `allow_huge=True`
(the CLI's --allow-huge).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import OptimalStepsError

MAX_STEPS = 10_000  # a schedule this long is hours of model calls: ask first
MAX_SAMPLES = 1_000_000
MAX_SEED = 2**63  # seeds are whole numbers in [0, 2**63)
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """A whole number in [minimum, maximum]."""
    if not _is_int(value):
        raise OptimalStepsError(f"{name} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise OptimalStepsError(f"{name} must be at least {minimum}{upper}, got {value}")
    return int(value)


def check_optional_int(value: Any, name: str, minimum: int = 1) -> Optional[int]:
    return None if value is None else check_int(value, name, minimum)


def check_seed(seed: Any, name: str = "seed") -> int:
    if not _is_int(seed) or not 0 <= seed < MAX_SEED:
        raise OptimalStepsError(f"{name} must be a whole number in [0, 2**63), got {seed!r}")
    return int(seed)


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf,
                 open_low: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with open_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise OptimalStepsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = value <= low if open_low else value < low
    if not math.isfinite(value) or below or value > high:
        if low == 0 and high == math.inf:
            bounds = f"a finite {'positive' if open_low else 'non-negative'} number"
        else:
            bounds = f"a finite number in {'(' if open_low else '['}{low:g}, {high:g}]"
        raise OptimalStepsError(f"{name} must be {bounds}, got {value:g}")
    return value


def check_steps_bound(steps: int, allow_huge: bool = False, what: str = "steps") -> int:
    if steps > MAX_STEPS and not allow_huge:
        raise OptimalStepsError(f"{what} {steps} is more than {MAX_STEPS} (hours of model calls); "
                                "pass --allow-huge if you mean it")
    return steps


def available_memory() -> Optional[int]:
    """Bytes of host memory available now (None where unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(count: int, element_bytes: int, what: str) -> None:
    """Refuse an allocation of `count` elements that cannot fit in the host memory available."""
    need = int(count) * int(element_bytes)
    have = available_memory()
    if have is not None and need > have:
        raise OptimalStepsError(f"{what} needs {need / 2**30:.3g} GiB but {have / 2**30:.3g} GiB of memory "
                                "is available")


def check_noise_count(count: Any, sample_shape: Sequence[int], allow_huge: bool = False) -> int:
    """A number of noise samples that can be drawn (float64 draws) on this machine."""
    count = check_int(count, "number of samples")
    if count > MAX_SAMPLES and not allow_huge:
        raise OptimalStepsError(f"{count} samples is more than {MAX_SAMPLES}; pass --allow-huge "
                                "(API: draw_noise(..., allow_huge=True)) if you mean it")
    check_allocation(count * math.prod(sample_shape), 8, f"{count} noise samples of shape {list(sample_shape)}")
    return count


def as_noise(noise: Any, model: Any = None, what: str = "noise") -> torch.Tensor:
    """Noise [B, ...] as a real floating-point tensor: numpy arrays are converted (any byte order;
    long double becomes float64), integer / complex / boolean values, wrong shapes and NaN are refused."""
    if isinstance(noise, np.ndarray):
        if noise.dtype.kind != "f":
            raise OptimalStepsError(f"{what} must hold real floating-point values, got numpy {noise.dtype}")
        native = np.float64 if noise.dtype.itemsize > 8 else noise.dtype.newbyteorder("=")
        noise = torch.from_numpy(np.ascontiguousarray(noise, dtype=native))
    if not isinstance(noise, torch.Tensor):
        raise OptimalStepsError(f"{what} must be a tensor [B, ...], got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise OptimalStepsError(f"{what} must hold real floating-point values, got {noise.dtype}")
    if noise.dim() < 2 or noise.shape[0] < 1:
        raise OptimalStepsError(f"{what} must have shape [B, ...] with at least one sample, got {list(noise.shape)}")
    shape = getattr(model, "sample_shape", None)
    if shape is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise OptimalStepsError(f"{what} has shape {list(noise.shape)}, expected [B, "
                                f"{', '.join(str(int(s)) for s in shape)}] (the model's sample shape)")
    if not torch.isfinite(noise).all():
        raise OptimalStepsError(f"{what} contains NaN or inf")
    return noise


def check_model(model: Any, what: str = "model") -> Any:
    """A model's optional `sample_shape` must be positive whole numbers (noise is drawn from it)."""
    shape = getattr(model, "sample_shape", None)
    if shape is None:
        return model
    try:
        dims = tuple(shape)
    except TypeError:
        raise OptimalStepsError(f"{what}'s sample_shape must be a tuple of whole numbers, got {shape!r}") from None
    if not dims or not all(_is_int(s) and s >= 1 for s in dims):
        raise OptimalStepsError(f"{what}'s sample_shape must be positive whole numbers, got {shape!r}")
    return model


def call_user_factory(factory: Any, where: str) -> Any:
    """A user's model factory, called without arguments: its errors (and sys.exit) in one line."""
    try:
        return factory()
    except SystemExit as exc:
        raise OptimalStepsError(f"{where} called sys.exit({exc.code!r}) instead of returning a model") from None
    except Exception as exc:
        raise OptimalStepsError(f"{where} raised {type(exc).__name__}: {exc}") from None


def check_schedule_arg(schedule: Any, what: str = "schedule") -> None:
    """A Schedule or a sequence / tensor of times, not a schedule name."""
    if isinstance(schedule, str):
        raise OptimalStepsError(f"{what} must be a Schedule or a sequence of times, got the name {schedule!r}; "
                                f"make one with make_schedule({schedule!r}, process, steps)")
    if isinstance(schedule, (dict, set)) or schedule is None:
        raise OptimalStepsError(f"{what} must be a Schedule or a sequence of times, got {type(schedule).__name__}")


def check_metadata(metadata: Any, what: str = "schedule metadata") -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise OptimalStepsError(f"{what} must be a JSON object, got {type(metadata).__name__}")
    if "noise_scale_time" in metadata:
        check_number(metadata["noise_scale_time"], f"{what} 'noise_scale_time'")
    return metadata


def check_storage_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES)
        raise OptimalStepsError(f"storage dtype must be one of {names}, got {dtype}")
    return dtype


def check_indices(values: Optional[Sequence[int]], size: int, name: str, dim: str) -> None:
    """Channel / frame indices within a sample dimension of `size`."""
    if values is None:
        return
    try:
        items = list(values)
    except TypeError:
        raise OptimalStepsError(f"{name} must be a list of whole numbers, got {values!r}") from None
    if not items:
        raise OptimalStepsError(f"{name} must name at least one {dim}")
    bad = [v for v in items if not _is_int(v) or not 0 <= v < size]
    if bad:
        raise OptimalStepsError(f"{name} {bad} out of range: the samples have {size} {dim}s (0..{size - 1})")


def check_search_args(noise: torch.Tensor, cost_channels: Any, cost_frames: Any, seed: Any) -> None:
    """search()'s arguments that depend on the noise (the cost subset) and its seed."""
    if seed is not None:
        check_seed(seed)
    shape = tuple(noise.shape[1:])
    check_indices(cost_channels, shape[0], "cost_channels", "channel")
    if cost_frames is not None and len(shape) < 4:
        raise OptimalStepsError(f"cost_frames needs 4-d samples [C, F, H, W], got shape {list(shape)}")
    check_indices(cost_frames, shape[1] if len(shape) > 1 else 0, "cost_frames", "frame")


# ------------------------------------------------------------------------------------ output paths

def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this process can create files in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptimalStepsError(f"{what} {path}: {parent} is a file, not a directory")
    try:  # a real file, not os.access: read-only mounts and special file systems refuse root too
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OptimalStepsError(f"{what} {path}: cannot write in {parent} ({exc.strerror or exc})") from None


def check_output_file(path: Any, overwrite: bool = False, what: str = "--out") -> Optional[Path]:
    """An output file that can be written: not empty, not a directory, in a writable place, and not an
    existing file unless `overwrite`. Checked before any work, so a run never dies at its end."""
    if path is None:
        return None
    if not str(path).strip():
        raise OptimalStepsError(f"{what} is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise OptimalStepsError(f"{what} {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OptimalStepsError(f"{path} already exists; choose another path or pass --force to overwrite")
    _writable_parent(path, what)
    return path


def check_output_dir(directory: Any, names: Sequence[str], overwrite: bool = False, what: str = "--out") -> Path:
    """An output folder that will receive `names`: a directory (or creatable), each name free (or a file
    to replace with `overwrite`), never a directory."""
    if directory is None or not str(directory).strip():
        raise OptimalStepsError(f"{what} is empty; give a folder name")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OptimalStepsError(f"{what} {directory} is a file, not a folder")
    if directory.is_dir():
        _writable_parent(directory / "probe", what)
        for name in names:
            target = directory / name
            if target.is_dir():
                raise OptimalStepsError(f"{what} {directory} holds a folder {name} where a result file goes")
            if target.exists() and not overwrite:
                raise OptimalStepsError(f"{target} already exists; choose another folder or pass --force to "
                                        "overwrite")
    else:
        _writable_parent(directory, what)
    return directory


def check_distinct_paths(paths: dict[str, Any]) -> None:
    """Outputs and inputs of one command must be different files (`paths`: flag -> path or None)."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None or not str(path).strip():
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise OptimalStepsError(f"{flag} and {seen[resolved]} name the same path {path}")
        seen[resolved] = flag
