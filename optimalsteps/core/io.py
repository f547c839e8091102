"""Files, written once: atomic writes that refuse to replace a user's file, and readers whose failures are
one-line `OptimalStepsError`s naming the file.

A write goes to a temporary file beside the target, is flushed to disk, and is renamed over the target
(`os.replace`, atomic on one file system), so a reader never sees half a file; the temporary file is
removed if anything fails on the way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptimalStepsError


def check_writable(path: str | Path | None, overwrite: bool = False) -> None:
    """Refuse early, before any work, to replace a file the user has."""
    if path and Path(path).exists() and not overwrite:
        raise OptimalStepsError(f"{path} already exists; choose another path or pass --force to overwrite")


def write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> None:
    """Write a file atomically (temporary file, fsync, rename), refusing to replace one unless asked."""
    path = Path(path)
    check_writable(path, overwrite)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
    write_bytes(path, text.encode(), overwrite)


def load_json(path: str | Path, what: str) -> Any:
    """The JSON in a file, or a one-line error naming `what` could not be read."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OptimalStepsError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptimalStepsError(f"{what} {path} is not valid JSON: {exc}") from None


def load_npy(path: str | Path, what: str) -> np.ndarray:
    """A .npy array (no pickles), or a one-line error naming `what` could not be read."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise OptimalStepsError(f"{what} not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise OptimalStepsError(f"{what} {path} is not a readable .npy array: {exc}") from None
