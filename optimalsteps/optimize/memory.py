"""Where the search keeps its large tensors, and how much memory it will need before it starts.

The teacher trajectory is N+1 latents per sample: for video latents that is tens of GB. It can live on the
compute device ("memory"), in (pinned) host memory ("cpu") or in a memory-mapped file ("disk"), in a
lower precision (`storage_dtype`: bfloat16 / float16) while costs are still computed in float32 or better.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.errors import OptimalStepsError

STORAGES = ("memory", "cpu", "disk")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}


def storage_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in STORAGE_DTYPES:
        raise OptimalStepsError(f"unknown storage dtype {name!r}; known: {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise OptimalStepsError(f"unknown storage {storage!r}; known: {', '.join(STORAGES)}")
    return storage


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, storage: str,
             directory: str | Path | None = None, name: str = "trajectory") -> torch.Tensor:
    """An uninitialised tensor in the chosen storage."""
    if check_storage(storage) == "memory":
        return torch.empty(shape, dtype=dtype, device=device)
    if storage == "cpu":
        pin = device.type == "cuda" and torch.cuda.is_available()
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    if directory is None:
        raise OptimalStepsError("storage 'disk' needs a directory (--storage-dir)")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptimalStepsError(f"cannot use --storage-dir {directory}: {exc.strerror or exc}") from None
    path = directory / f"{name}.{os.getpid()}.bin"
    numel = 1
    for s in shape:
        numel *= int(s)
    try:
        with open(path, "wb") as handle:
            handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).reshape(shape)
    except OSError as exc:
        raise OptimalStepsError(f"cannot create the trajectory file in --storage-dir {directory}: "
                                f"{exc.strerror or exc}") from None
    finally:
        # the mapping keeps the (disk-backed) pages; the name goes at once, so the file disappears
        # when the search ends, however it ends
        path.unlink(missing_ok=True)
    return mapped


def estimate_search_bytes(samples: int, sample_numel: int, grid_points: int, multistep: bool, x0_cost: bool,
                          storage: str, trajectory_dtype: torch.dtype, state_dtype: torch.dtype,
                          target_chunk: int | None, cost_dtype: torch.dtype = torch.float64,
                          source_corrector: bool = False) -> dict[str, int]:
    """Bytes the search will hold at its peak, by place.

    In `storage`: the teacher trajectory (and its clean estimates for the x0 cost) and the DP's layer
    stores: two layers of states (plus previous clean estimates for multistep solvers, cached estimates
    for the x0 cost) and the sources' clean estimates. On the compute device: blocks of `target_chunk`
    grid points per sample (sources and targets in the cost dtype, the candidate states being built) and
    the [B, S, J] cost tables; with storage "memory" the stores are on the device too."""
    per_point = samples * sample_numel
    traj = grid_points * per_point * torch.empty((), dtype=trajectory_dtype).element_size() * (2 if x0_cost else 1)
    state_bytes = torch.empty((), dtype=state_dtype).element_size()
    # UniPC adds two layers of pending corrections and the sources' corrected states
    stores = grid_points * per_point * state_bytes * (3 + (2 if multistep else 0) + (2 if x0_cost else 0)
                                                      + (3 if source_corrector else 0))
    chunk = min(target_chunk or grid_points, grid_points)
    wide = torch.empty((), dtype=cost_dtype).element_size()
    # the larger of the two phases of a layer: scoring (three source vectors and the targets of a block in
    # the cost dtype) and building (the winners' rows, candidate and best states, the cost's differences)
    blocks = chunk * per_point * max(4 * wide, 3 * wide + 6 * state_bytes)
    tables = 6 * samples * grid_points * grid_points * wide
    out = {"device": blocks + tables, "host": 0, "disk": 0}
    out[{"memory": "device", "cpu": "host", "disk": "disk"}[storage]] += traj + stores
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_beam_bytes(samples: int, sample_numel: int, points: int, steps: int, width: int, multistep: bool,
                        state_dtype: torch.dtype, block_elements: int, source_corrector: bool = False) -> int:
    """Peak bytes of one beam DP (optimize/beam.py) on a grid of `points` teacher points, beyond the teacher
    trajectory it reads; s is the state dtype's size, a vector is B * D elements.

    With J = points - steps targets per inner layer and E = width * J entries (histories) per layer, each
    with k kept vectors (state, model estimate, and for multistep solvers the previous estimate: k = 3, else
    2; UniPC's pending correction adds one, k = 4): the copy of the teacher at the grid (points vectors), then the larger of a layer's two phases.
    Scoring: the layer's k * E vectors and a block of P = min(E, max(1, block_elements // (J * B * D))) * J
    candidate states, each element taking (k + 3) * s bytes while it is stepped (the entries' gathered vectors,
    the running sum, a term) or s + 16 (+ 8 below float64) while its error is taken (the state, the teacher's
    in float64, their difference, the state's float64 copy), and 48 bytes per pair for its coefficients,
    indices and times. Keeping: the old layer and the new one with its gathered copy, 2 * k * E vectors.
    Throughout: 8 bytes per entry and target (the scores), per step of its path in the old and the new layer,
    and 8 more per entry (times, indices). The model's own activations are not counted."""
    size = _itemsize(state_dtype)
    vector = samples * sample_numel
    cells = max(1, points - steps)
    entries = width * cells
    kept = (3 if multistep else 2) + (1 if source_corrector else 0)
    pairs = min(entries, max(1, block_elements // (cells * vector))) * cells * vector
    stepping = (kept + 3) * size
    scoring = size + 16 + (8 if size < 8 else 0)
    # UniPC: the layer's corrected states are made beside the entries' states and bases, so one more vector
    held = kept + (1 if source_corrector else 0)
    scored = held * entries * vector * size + pairs * max(stepping, scoring) + pairs // vector * 48
    bookkeeping = entries * (cells + 2 * (steps + 1) + 8) * 8
    layer = max(scored, 2 * kept * entries * vector * size) + bookkeeping
    return points * vector * size + layer


def estimate_validated_bytes(samples: int, validation_samples: int, sample_numel: int, grid_points: int, steps: int,
                             multistep: bool, state_dtype: torch.dtype, block_elements: int,
                             variant_runs: list[tuple[int, int]], source_corrector: bool = False) -> dict[str, int]:
    """Bytes the validated search (optimize/select.py) holds at its peak, all on the compute device: the
    search teacher's trajectory (B * grid_points vectors of D elements) throughout, then the larger of the
    main DP (the beam DP of width 1 on the full grid) and, once the validation teacher's trajectory (V *
    grid_points vectors) is held too, the largest of the DP variants' runs `variant_runs` ((grid points,
    width) each, `estimate_beam_bytes`). Candidates are scored by sampling V states at a time: negligible."""
    teacher = grid_points * sample_numel * _itemsize(state_dtype)

    def beam(points: int, width: int) -> int:
        return estimate_beam_bytes(samples, sample_numel, points, steps, width, multistep, state_dtype,
                                   block_elements, source_corrector)

    variants = max((beam(points, width) for points, width in variant_runs), default=0)
    device = samples * teacher + max(beam(grid_points, 1), validation_samples * teacher + variants)
    return {"device": device, "host": 0, "disk": 0}


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (None where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} TiB"


def check_fits(estimate: dict[str, int], device: torch.device, limit: int | None = None) -> None:
    """Refuse, before any model call, a search whose estimate exceeds the limit or what is free."""
    need = estimate["device"] + (estimate["host"] if device.type == "cpu" else 0)
    have = limit if limit is not None else available_bytes(device)
    if have is not None and need > have:
        where = "the limit" if limit is not None else f"free on {device}"
        raise OptimalStepsError(
            f"the search needs about {format_bytes(need)} on {device} but {format_bytes(have)} is {where}; "
            "use --storage cpu or disk, --storage-dtype bfloat16, fewer --samples, a cost subset, "
            "or a smaller --target-chunk"
        )
