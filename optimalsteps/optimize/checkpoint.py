"""Checkpoints of a long search: written after the teacher and after each DP layer, atomically.

Each file is written to a temporary name, flushed, and renamed; its sha256 is then written beside it
the same way. On resume the newest file whose hash matches is used, so a crash mid-write (a truncated
file) falls back to the previous layer. A checkpoint made with other settings is refused with a message
naming what differs.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.errors import OptimalStepsError
from ..core.io import write_bytes

SETTINGS = "settings.json"


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes(path, data, overwrite=True)  # a checkpoint replaces the search's own earlier file


class Checkpointer:
    """Checkpoint files of one search (one set per rank) in `directory`."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], rank: int = 0, resume: bool = False):
        self.directory = Path(directory)
        self.rank = rank
        self.settings = settings
        stored_path = self.directory / SETTINGS
        if stored_path.exists():
            try:
                stored = json.loads(stored_path.read_text())
            except (json.JSONDecodeError, OSError) as exc:
                raise OptimalStepsError(f"checkpoint settings {stored_path} are unreadable: {exc}") from None
            if not resume:
                raise OptimalStepsError(
                    f"{self.directory} already holds a search checkpoint; pass --resume to continue it "
                    "or choose another --checkpoint directory")
            differ = [f"{k}: {stored.get(k)!r} in the checkpoint, {v!r} now" for k, v in settings.items()
                      if stored.get(k) != v]
            if differ:
                raise OptimalStepsError(f"checkpoint in {self.directory} was made with other settings ("
                                        + "; ".join(differ) + ")")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            if rank == 0:
                _atomic_write(stored_path, (json.dumps(settings, indent=2) + "\n").encode())

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.rank{self.rank}.pt"

    def save(self, name: str, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        path = self._path(name)
        _atomic_write(path, data)
        _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())

    def load(self, name: str) -> Optional[dict[str, Any]]:
        """The payload if its file is complete (hash matches), else None."""
        path = self._path(name)
        digest_path = path.with_name(path.name + ".sha256")
        if not path.exists() or not digest_path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest_path.read_text().strip():
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def latest_layer(self, steps: int) -> tuple[int, Optional[dict[str, Any]]]:
        """The newest complete layer checkpoint (k, payload), or (0, None)."""
        for k in range(steps, 0, -1):
            payload = self.load(f"layer-{k:04d}")
            if payload is not None:
                return k, payload
        return 0, None


def fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's values (identifies the search noise)."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
