"""Wan 2.2's two experts: the high-noise transformer runs at flow sigma >= the boundary (boundary_ratio), the
low-noise `transformer_2` below it. A searched schedule puts a step exactly on the boundary, so each expert
sees only its own noise levels, and comes back as the two halves a two-stage sampler runs.

The search runs in two stages with the project's search:
- stage 1, the high-noise expert from the pipeline's latents down to the boundary;
- stage 2, the low-noise expert from the state stage 1's schedule reaches at the boundary down to 0 (the
  state the second stage of a two-stage sampler receives), against a teacher run from that state.
Each stage's segment [lo, hi] of flow time is searched as a flow process over s in [0, 1] with
t = lo + (hi - lo) s, the model's velocity scaled by (hi - lo): an Euler step in s is the Euler step in t,
so the schedules found are exact for euler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core.errors import OptimalStepsError
from ...core.models import model_time_dtype
from ...core.processes import FLOW
from ...core.schedules import Schedule
from ...core.solvers import sample
from ...optimize.options import from_flat


@dataclass
class ExpertSchedule:
    """A schedule with a step exactly on the experts' boundary, and its two halves."""

    schedule: Schedule  # the whole schedule, boundary included
    boundary: float  # flow sigma of the boundary (boundary_ratio)
    experts: list[int]  # per step: 1 (`transformer`) or 2 (`transformer_2`)
    high_sigmas: list[float]  # the first stage's sigmas, 1 ... boundary
    low_sigmas: list[float]  # the second stage's sigmas, boundary ... 0
    stages: tuple[Any, Any]  # the two SearchResults (stage 1 in the rescaled time s)

    @property
    def split_step(self) -> int:
        """Steps the high-noise expert runs (a two-stage sampler's end_at_step / start_at_step)."""
        return len(self.high_sigmas) - 1


class _Segment:
    """A flow model on times [lo, hi] seen as a flow model over s in [0, 1], t = lo + (hi - lo) s."""

    process = FLOW
    prediction = "velocity"

    def __init__(self, model: Any, lo: float, hi: float):
        self.model, self.lo, self.hi = model, lo, hi
        self.sample_shape = getattr(model, "sample_shape", None)

    @property
    def time_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.model, "time_dtype", None)

    def __call__(self, x: torch.Tensor, s: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        t = self.lo + (self.hi - self.lo) * s.double()
        return (self.hi - self.lo) * self.model(x, t.to(model_time_dtype(self.model, x)), **cond)

    def times(self, s: torch.Tensor) -> torch.Tensor:
        t = self.lo + (self.hi - self.lo) * s
        t[-1] = self.lo  # exactly
        return t

    def grid(self, times: torch.Tensor) -> Schedule:
        s = (times - self.lo) / (self.hi - self.lo)
        s[0], s[-1] = 1.0, 0.0  # exactly
        return Schedule(s, FLOW)


def teacher_through(teacher: Schedule, boundary: float) -> tuple[Schedule, int]:
    """The teacher grid with its point nearest the boundary moved onto it, and that point's index."""
    times = teacher.times.clone()
    index = int(torch.argmin((times[1:-1] - boundary).abs())) + 1
    times[index] = boundary
    if not bool((times[1:] < times[:-1]).all()):
        raise OptimalStepsError(f"the teacher grid is too coarse to hold the boundary {boundary:g}; use more "
                                "teacher steps")
    return Schedule(times, teacher.process, metadata=dict(teacher.metadata, boundary=boundary)), index


def default_high_steps(default: Schedule, boundary: float, steps: int) -> int:
    """How many of `steps` steps the pipeline's own schedule runs with the high-noise expert."""
    share = float((default.times[:-1] >= boundary).double().mean())
    return min(max(1, round(share * steps)), steps - 1)


def search_experts(search: Any, model: Any, noise: torch.Tensor, steps: int, high_steps: int, teacher: Schedule,
                   boundary: float, cond: dict, solver: str, **options: Any) -> ExpertSchedule:
    """Search `steps` steps of which `high_steps` run the high-noise expert down to `boundary` exactly."""
    if solver != "euler":
        raise OptimalStepsError(f"the two-expert search runs euler (its rescaled first stage is exact for euler), "
                                f"not {solver}")
    if not 1 <= high_steps < steps:
        raise OptimalStepsError(f"high_steps must be between 1 and {steps - 1} for {steps} steps, got {high_steps}")
    grid, index = teacher_through(teacher, boundary)
    if not (high_steps < index + 1 and steps - high_steps < len(grid.times) - index):
        raise OptimalStepsError("the teacher grid has too few points on one side of the boundary; use more "
                                "teacher steps")
    upper, lower = _Segment(model, boundary, float(grid.times[0])), _Segment(model, 0.0, boundary)
    first = search(upper, noise, high_steps, teacher_grid=upper.grid(grid.times[: index + 1]), cond=cond,
                   solver=solver, **from_flat(options))
    # a flow state at s = 1 is sigma(1) * noise = noise: stage 2 gets the boundary state as its noise
    x_boundary = sample(upper, noise, first.schedule, solver=solver, cond=cond).samples
    second = search(lower, x_boundary, steps - high_steps, teacher_grid=lower.grid(grid.times[index:]),
                    cond=cond, solver=solver, **from_flat(options))
    high, low = upper.times(first.schedule.times), lower.times(second.schedule.times)
    low[0] = boundary
    times = torch.cat([high, low[1:]])
    schedule = Schedule(times, FLOW, solver=solver,
                        metadata={"boundary": boundary, "split_step": high_steps, "teacher_steps": len(grid.times) - 1})
    experts = [1] * high_steps + [2] * (steps - high_steps)
    return ExpertSchedule(schedule, boundary, experts, high.tolist(), low.tolist(), (first, second))
