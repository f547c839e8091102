"""The teacher: its default grid, its trajectory on the search noise (kept in the chosen storage and
precision), and its amplitude statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import distributed as dd
from ..core.errors import OptimalStepsError
from ..core.models import index_cond, model_process, predict_x0
from ..core.schedules import Schedule
from ..core.solvers import initial_state, solver_step
from .memory import allocate


@dataclass
class Teacher:
    states: torch.Tensor  # [B, N+1, ...] the teacher trajectory at every grid point
    x0: Optional[torch.Tensor]  # [B, N+1, ...] its clean estimates (the state itself at the end), if kept
    nfe: int  # per sample


def run_teacher(model: Any, noise: torch.Tensor, teacher: Schedule, solver: str, cond: dict | None = None,
                progress: bool = False, max_batch: int = 4096, storage_dtype: torch.dtype | None = None,
                storage: str = "memory", storage_dir: str | None = None, keep_x0: bool = True) -> Teacher:
    """The teacher trajectory with the student's solver, keeping its states (and clean estimates) in the
    chosen storage and precision; the teacher itself always steps in float32 or better."""
    process = model_process(model)
    times = teacher.times.tolist()
    x = initial_state(process, noise, times[0])
    dtype = storage_dtype or x.dtype
    shape = (x.shape[0], len(times)) + tuple(x.shape[1:])
    states = allocate(shape, dtype, x.device, storage, storage_dir, "teacher-states")
    x0s = allocate(shape, dtype, x.device, storage, storage_dir, "teacher-x0") if keep_x0 else None
    states[:, 0] = x
    x0_prev, t_prev, nfe, correction = None, None, 0, None
    for i in tqdm(range(len(times) - 1), desc="teacher", disable=not progress, leave=False):
        try:
            x0 = predict_chunked(model, x, torch.full((x.shape[0],), times[i], dtype=torch.float64), cond, max_batch)
            out = solver_step(solver, model, x, times[i], times[i + 1], x0=x0, x0_prev=x0_prev, t_prev=t_prev,
                              cond=cond, correction=correction)
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"teacher step {i + 1} of {len(times) - 1}: {exc}") from None
        if x0s is not None:
            x0s[:, i] = x0
        x, x0_prev, t_prev, nfe, correction = out.x, x0, times[i], nfe + out.nfe + 1, out.correction
        states[:, i + 1] = x
    if x0s is not None:
        x0s[:, -1] = x
    return Teacher(states, x0s, nfe)


def predict_chunked(model: Any, x: torch.Tensor, t: torch.Tensor, cond: dict | None, max_batch: int,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """predict_x0 in chunks of at most max_batch states; `rows` maps each state to its sample's condition."""
    out = []
    for start in range(0, x.shape[0], max_batch):
        stop = min(start + max_batch, x.shape[0])
        sub_cond = cond
        if cond:
            idx = rows[start:stop] if rows is not None else torch.arange(start, stop)
            sub_cond = index_cond(cond, idx)
        out.append(predict_x0(model, x[start:stop], t[start:stop], sub_cond))
    return torch.cat(out) if len(out) > 1 else out[0]


def amplitude_statistics(states: torch.Tensor, low: float = 0.05, high: float = 0.95,
                         part: dd.Shard | None = None) -> dict[str, list[float]]:
    """Per grid index, the mean over samples (of all ranks) of each sample's low / high quantile of its
    state (paper sec. 3.4)."""
    sums = torch.zeros(2, states.shape[1], dtype=torch.float64)
    for b in range(states.shape[0]):  # one sample at a time: quantile copies its input
        flat = states[b].reshape(states.shape[1], -1).to(torch.float32)
        sums += torch.quantile(flat, torch.tensor([low, high], dtype=torch.float32, device=flat.device),
                               dim=-1).cpu().double()
    count = states.shape[0]
    if part is not None and part.active:
        sums = dd.all_reduce_sum(sums.to(reduce_device()), part).cpu()
        count = part.total
    mean = sums / count
    return {"q05": mean[0].tolist(), "q95": mean[1].tolist()}


def reduce_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    if dd.is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
