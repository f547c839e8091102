"""Coarse-to-fine search: the DP on an evenly spaced sub-grid of the teacher grid (the teacher runs once,
on the full grid, and its states there are reused), then level by level on finer strides restricted to a
band around each chosen point, one band per DP layer, re-centring a band while a chosen point sits on
its edge. A layer then evaluates the model at a handful of source states instead of about N. It is a
heuristic: it need not find the full DP's schedule (docs/refine.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import distributed as dd
from ..core.errors import OptimalStepsError
from .dp import DPContext, exact_dp, trace_path
from .teacher import Teacher

@dataclass(frozen=True)
class CoarseToFine:
    """Options of the coarse-to-fine search (`search(..., coarse_to_fine=CoarseToFine(...))`)."""

    coarse_steps: int | None = None  # steps of the coarse sub-grid; default `default_coarse_steps`
    factor: int = 4  # each finer level divides the stride by this much, down to the teacher grid
    window: int | None = None  # half-width of the finest band; default: half the previous level's stride
    rounds: int = 2  # band searches per level at most (re-centred while a choice sits on a band's edge)


def default_coarse_steps(steps: int, teacher_steps: int) -> int:
    """About a sixteenth of the teacher grid, and at least twice the student's steps."""
    return min(teacher_steps, max(2 * steps, math.ceil(teacher_steps / 16)))


def level_strides(teacher_steps: int, coarse_steps: int, factor: int) -> list[int]:
    """Grid strides of the band levels after the coarse one, ending at 1 (the teacher grid itself)."""
    stride = teacher_steps / coarse_steps
    strides = []
    while stride > 1:
        stride = max(1, math.floor(stride / factor))
        strides.append(int(stride))
    return strides


def _restricted(ctx: DPContext, index: torch.Tensor, cells: torch.Tensor | None = None) -> DPContext:
    """The DP context on the sub-grid `index` of the teacher grid, reusing the teacher's states there
    (sub-DPs are cheap: they are not checkpointed)."""
    def rows(store: torch.Tensor | None) -> torch.Tensor | None:
        return None if store is None else store[:, index.to(store.device)]

    teacher = Teacher(rows(ctx.teacher.states), rows(ctx.teacher.x0), ctx.teacher.nfe)
    return replace(ctx, times=ctx.times[index.to(ctx.times.device)], teacher=teacher, nfe=0, cells=cells,
                   checkpointer=None)


def _paths(ctx: DPContext, traces: torch.Tensor, index: torch.Tensor) -> list[list[int]]:
    """The traced path(s) of a sub-grid DP in teacher-grid indices: one (joint), or every sample's of every
    rank (median)."""
    n = len(index) - 1
    tables = list(traces) if ctx.per_sample else [traces]
    local = [[int(index[i]) for i in trace_path(t, ctx.steps, n, False)] for t in tables]
    if not ctx.per_sample:
        return local  # every rank took the same, all-reduced decisions
    return [path for chunk in dd.all_gather_objects(local, ctx.part) for path in chunk]


def _bands(centres: list[list[int]], window: int, stride: int, n: int, steps: int) -> torch.Tensor:
    """[M+1, N+1] cells a band DP may fill: layer k keeps the points c + i * stride within `window` of any
    centre path's k-th point c that leave room for the other steps; layer 0 the start, layer M the end."""
    cells = torch.zeros((steps + 1, n + 1), dtype=torch.bool)
    cells[0, 0] = True
    cells[steps, n] = True
    offsets = torch.arange(-(window // stride), window // stride + 1) * stride
    for k in range(1, steps):
        for path in centres:
            points = path[k] + offsets
            cells[k, points[(points >= k) & (points <= n - steps + k)]] = True
    return cells


def _on_edge(paths: list[list[int]], centres: list[list[int]], window: int, stride: int, n: int,
             steps: int) -> bool:
    """Whether a chosen point sits on its band's edge where the band could still move."""
    reach = (window // stride) * stride
    for path in paths:
        for k in range(1, steps):
            if min(abs(path[k] - c[k]) for c in centres) >= reach and k < path[k] < n - steps + k:
                return True
    return False


def _to_fine(values: torch.Tensor, index: torch.Tensor, n: int, fill: float | int, is_trace: bool) -> torch.Tensor:
    """A sub-grid table [..., U] on the teacher grid [..., N+1] (trace entries mapped to teacher indices)."""
    index = index.cpu()
    out = torch.full(values.shape[:-1] + (n + 1,), fill, dtype=values.dtype)
    if is_trace:
        values = torch.where(values >= 0, index[values.clamp(min=0)], values)
    out[..., index] = values
    return out


def _check_options(options: CoarseToFine, steps: int, n: int) -> int:
    """The coarse grid's steps, after checking the options."""
    coarse_steps = options.coarse_steps if options.coarse_steps is not None else default_coarse_steps(steps, n)
    for what, value, least in (("coarse_steps", coarse_steps, steps + 1), ("factor", options.factor, 2),
                               ("rounds", options.rounds, 1), ("window", options.window or 1, 1)):
        if isinstance(value, bool) or int(value) != value or value < least:
            raise OptimalStepsError(f"coarse-to-fine {what} must be a whole number >= {least}, got {value!r}")
    return int(coarse_steps)


def coarse_to_fine_dp(ctx: DPContext, options: CoarseToFine | bool = True):
    """The search's DP, coarse to fine: (traces, cost table, model calls, info) on the full teacher grid,
    as `search` expects of its DP, plus a dict describing the levels.

    The DP runs on `coarse_steps` + 1 evenly spaced teacher grid points; then, level by level, the stride
    drops by `factor` and the DP runs again on bands of half the previous stride either side of each chosen
    point (one band per layer), until the stride is 1. Table cells outside the last band are unreached."""
    options = options if isinstance(options, CoarseToFine) else CoarseToFine()
    n, steps = len(ctx.times) - 1, ctx.steps
    coarse_steps = _check_options(options, steps, n)
    device = ctx.times.device
    if coarse_steps >= n:  # nothing coarser than the grid itself
        traces, table, nfe = exact_dp(ctx)
        return traces, table, nfe, {"coarse_steps": n, "levels": [], "nfe": [nfe]}
    index = torch.unique(torch.linspace(0, n, coarse_steps + 1, dtype=torch.float64).round().long()).to(device)
    traces, table, nfe = exact_dp(_restricted(ctx, index))
    strides = level_strides(n, coarse_steps, options.factor)
    info = {"coarse_steps": coarse_steps, "levels": [], "nfe": [nfe]}
    previous = n / coarse_steps
    for level, stride in enumerate(strides):
        last = level == len(strides) - 1
        window = options.window if (last and options.window) else max(stride, math.ceil(previous / 2))
        centres = _paths(ctx, traces, index)
        for rounds in range(1, options.rounds + 1):
            cells = _bands(centres, window, stride, n, steps)
            index = cells.any(0).nonzero().squeeze(1).to(device)
            traces, table, used = exact_dp(_restricted(ctx, index, cells[:, index.cpu()].to(device)))
            nfe += used
            info["nfe"].append(used)
            paths = _paths(ctx, traces, index)
            if not _on_edge(paths, centres, window, stride, n, steps):
                break
            centres = paths
        info["levels"].append({"stride": stride, "window": window, "rounds": rounds})
        previous = stride
    return (_to_fine(traces, index, n, -1, True), _to_fine(table, index, n, math.inf, False), nfe, info)
