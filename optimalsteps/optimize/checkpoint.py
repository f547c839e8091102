"""Checkpoints of a long search: written after the teacher and after each DP layer, atomically, and
bound to the run that wrote them.

Each file is written to a temporary name, flushed, and renamed; its sha256 is then written beside it
the same way. On resume the newest file whose hash matches is used, so a crash mid-write (a truncated
file) falls back to the previous layer. Every file carries the run's settings, which include
fingerprints of the model (its tensors, a network's weights), the search noise and the conditions: a
file written by another run, or a directory made with other settings, is refused naming what differs.
A directory is locked by the run using it, and is never read without `resume`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import OptimalStepsError
from ..core.io import write_bytes

SETTINGS = "settings.json"
# tensors with more elements are fingerprinted from a strided sample: host tensors are hashed whole up to
# 256 MiB of float32, accelerator tensors (a pipeline's weights) are sampled early to keep copies small
_SAMPLED_ABOVE_HOST = 1 << 26
_SAMPLED_ABOVE_DEVICE = 1 << 16
_SAMPLE_SIZE = 1 << 12
_NODE_BUDGET = 100_000  # the most values one model fingerprint walks (bounds odd user objects)
_SKIPPED = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, type,
            functools.partial, torch.Generator, torch.device, torch.dtype)


class _Lock:
    """An open, flock-ed lock file; `release` closes it once."""

    def __init__(self, fd: int):
        self.fd: Optional[int] = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_HELD: dict[str, _Lock] = {}  # lock path -> the lock this process holds there (locks are process-wide)


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes(path, data, overwrite=True)  # a checkpoint replaces the search's own earlier file


# ------------------------------------------------------------------------------------ fingerprints


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (a strided sample of a very large one), with its dtype and shape."""
    head = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    try:
        flat = tensor.detach().reshape(-1)
        if flat.numel() > (_SAMPLED_ABOVE_HOST if flat.device.type == "cpu" else _SAMPLED_ABOVE_DEVICE):
            flat = flat[:: flat.numel() // _SAMPLE_SIZE]
        flat = flat.cpu().contiguous()
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        return head + (flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    except (RuntimeError, TypeError, NotImplementedError):  # meta, sparse or quantised tensors: shape only
        return head


def fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's values, dtype and shape (identifies the search noise)."""
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()[:16]


def _feed(digest: Any, value: Any, depth: int, budget: list[int]) -> None:
    """Hash what determines a model's outputs: tensors, arrays, numbers, strings, and (to a small depth)
    the public attributes of objects; private attributes (caches by convention) and callables are left out."""
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(value, torch.Tensor):
        digest.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):  # any byte order or precision; object arrays by shape only
        digest.update(f"{value.dtype}{value.shape}".encode())
        if value.dtype.kind in "biufc":
            digest.update(np.ascontiguousarray(value).tobytes())
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(repr(value).encode())
    elif isinstance(value, torch.nn.Module):  # weights count at any depth
        digest.update(type(value).__qualname__.encode())
        for name, tensor in value.state_dict().items():
            digest.update(name.encode())
            digest.update(_tensor_bytes(tensor))
        _feed(digest, getattr(value, "config", None), depth - 1, budget)
    elif depth <= 0 or isinstance(value, _SKIPPED):
        return
    elif isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__"):
        if not isinstance(value, (dict, list, tuple)):
            digest.update(type(value).__qualname__.encode())
            value = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        items = sorted(value.items(), key=lambda kv: repr(kv[0])) if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            digest.update(repr(key).encode())
            _feed(digest, item, depth - 1, budget)


def model_fingerprint(model: Any) -> str:
    """A hash of what determines the model's outputs: the model's own `fingerprint()` if it has one, else
    its tensors and a network's weights (a file-backed model's contents), sampled where very large."""
    own = getattr(model, "fingerprint", None)
    if callable(own):
        return str(own())
    digest = hashlib.sha256()
    _feed(digest, model, depth=4, budget=[_NODE_BUDGET])
    return digest.hexdigest()[:16]


def cond_fingerprint(cond: dict | None) -> str | None:
    """A hash of the per-sample conditions (None without any)."""
    if not cond:
        return None
    digest = hashlib.sha256()
    _feed(digest, cond, depth=3, budget=[_NODE_BUDGET])
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------ the directory


def _checkpoint_files(directory: Path, rank: int) -> list[str]:
    return sorted(p.name for p in directory.glob(f"*.rank{rank}.pt"))


def _lock(directory: Path, rank: int) -> Optional[_Lock]:
    """An exclusive lock on the directory for this rank (released when the process ends, even killed)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return None
    path = directory / f".lock.rank{rank}"
    key = str(path.resolve())
    if key in _HELD:  # an earlier search of this process that never closed (e.g. it raised): take over
        _HELD.pop(key).release()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OptimalStepsError(f"checkpoint directory {directory} is in use by process {holder}; "
                                "wait for it to finish or choose another --checkpoint directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = _Lock(fd)
    return _HELD[key]


def _unlock(lock: Optional[_Lock]) -> None:
    if lock is None:
        return
    for key, held in list(_HELD.items()):
        if held is lock:
            del _HELD[key]
    lock.release()


def _prepare(directory: Path) -> None:
    """Create the directory, or say in one line why it cannot hold checkpoints."""
    if directory.exists() and not directory.is_dir():
        raise OptimalStepsError(f"--checkpoint {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OptimalStepsError(f"cannot write checkpoints in {directory}: {exc.strerror or exc}") from None


def _differences(stored: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    return [f"{k}: {stored.get(k)!r} in the checkpoint, {v!r} now" for k, v in settings.items() if stored.get(k) != v]


def _read_settings(path: Path) -> Optional[dict[str, Any]]:
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise OptimalStepsError(f"checkpoint settings {path} are unreadable: {exc}") from None
    if not isinstance(stored, dict):
        raise OptimalStepsError(f"checkpoint settings {path} must hold a JSON object, got {type(stored).__name__}")
    return stored


def clear_checkpoint(directory: str | Path) -> None:
    """Remove a checkpoint's files (settings, layers, hashes) so a new search can start there (--force)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    lock = _lock(directory, 0)  # never under a search that is running there
    try:
        for path in directory.iterdir():
            if path.name == SETTINGS or path.name.endswith((".pt", ".pt.sha256")):
                path.unlink()
    finally:
        _unlock(lock)


class Checkpointer:
    """Checkpoint files of one search (one set per rank) in `directory`, bound to `settings`."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], rank: int = 0, resume: bool = False):
        self.directory = Path(directory)
        self.rank = rank
        self.settings = settings
        _prepare(self.directory)
        self._lock = _lock(self.directory, rank)
        try:
            self._check_existing(resume)
        except BaseException:
            self.close()
            raise

    def _check_existing(self, resume: bool) -> None:
        stored_path = self.directory / SETTINGS
        stored = _read_settings(stored_path)
        files = _checkpoint_files(self.directory, self.rank)
        # rank 0 writes the settings file: other ranks judge by their own files alone
        if (stored is not None and self.rank == 0 or files) and not resume:
            listed = f" (it has {', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""
            raise OptimalStepsError(f"{self.directory} already holds a search checkpoint; pass --resume to continue "
                                    "it, --force to start over, or choose another --checkpoint directory" + listed)
        if stored is not None:
            differ = _differences(stored, self.settings)
            if differ:
                raise OptimalStepsError(f"checkpoint in {self.directory} was made with other settings ("
                                        + "; ".join(differ) + ")")
        elif self.rank == 0:
            _atomic_write(stored_path, (json.dumps(self.settings, indent=2) + "\n").encode())

    def close(self) -> None:
        """Release the directory's lock."""
        _unlock(self._lock)
        self._lock = None

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.rank{self.rank}.pt"

    def save(self, name: str, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**payload, "settings": self.settings}, buffer)
        data = buffer.getvalue()
        path = self._path(name)
        _atomic_write(path, data)
        _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())

    def load(self, name: str) -> Optional[dict[str, Any]]:
        """The payload if its file is complete (hash matches), else None; a complete file written by
        another run is refused."""
        path = self._path(name)
        digest_path = path.with_name(path.name + ".sha256")
        if not path.is_file() or not digest_path.is_file():
            return None
        data = path.read_bytes()
        try:
            expected = digest_path.read_text().strip()
        except UnicodeDecodeError:  # a damaged hash file: the checkpoint cannot be trusted
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            return None
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # a hash-matching file torch cannot read is as good as truncated
            return None
        stored = payload.pop("settings", None) if isinstance(payload, dict) else None
        if not isinstance(stored, dict):
            raise OptimalStepsError(f"checkpoint file {path} records no run settings; it was not written by "
                                    "this version of optimalsteps, start over with --force")
        differ = _differences(stored, self.settings)
        if differ:
            raise OptimalStepsError(f"checkpoint file {path} was written by another run (" + "; ".join(differ) + ")")
        return payload

    def latest_layer(self, steps: int) -> tuple[int, Optional[dict[str, Any]]]:
        """The newest complete layer checkpoint (k, payload), or (0, None)."""
        for k in range(steps, 0, -1):
            payload = self.load(f"layer-{k:04d}")
            if payload is not None:
                return k, payload
        return 0, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def run_settings(model: Any, noise: torch.Tensor, cond: dict | None, **settings: Any) -> dict[str, Any]:
    """The settings a checkpoint is bound to: the given search settings plus fingerprints of the model,
    the noise and the conditions."""
    return {"model": str(getattr(model, "spec", type(model).__name__)), "model_fingerprint": model_fingerprint(model),
            "noise": fingerprint(noise), "conditions": cond_fingerprint(cond), **settings}
