"""Wan 2.2's two experts: the high-noise transformer runs at flow sigma above the boundary (boundary_ratio), the
low-noise `transformer_2` at and below it. A searched schedule puts a step exactly on the boundary, so each
expert sees only its own noise levels, and comes back as the two halves a two-stage sampler runs.

One search does it, for every solver: the plain DP over a teacher grid holding the boundary, constrained to
be there after `high_steps` steps (`DPOptions.through`). The model routes each evaluation to its expert: the
step that lands on the boundary is the high expert's last (Heun's corrector there included, through the
model's `end_of_step`), the step that leaves it the low expert's first. The solver runs the schedule as one
loop, as diffusers' Wan 2.2 pipeline does: a multistep solver's first low step uses the high expert's last
estimate as its history, exactly as in the search.

Schedules made by name for such a pipeline (`expert_schedules`, what `compare` and `schedule` use): `oss` is
that search; every other name is the named schedule with its interior point nearest the boundary moved onto
it (`onto_boundary`, which records the move), so every schedule runs each expert on its own noise levels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch

from ...core.errors import OptimalStepsError
from ...core.models import model_teacher_grid
from ...core.schedules import Schedule
from ...evaluation.baselines import check_search_options, make_schedules
from ...optimize.options import DPOptions, from_flat
from ...optimize.result import SearchResult
from ...optimize.search import search


@dataclass
class ExpertSchedule:
    """A schedule with a step exactly on the experts' boundary, and its two halves."""

    schedule: Schedule  # the whole schedule, boundary included (the search's result.schedule)
    boundary: float  # flow sigma of the boundary (boundary_ratio)
    experts: list[int]  # per step: 1 (`transformer`) or 2 (`transformer_2`)
    high_sigmas: list[float]  # the first stage's sigmas, start ... boundary
    low_sigmas: list[float]  # the second stage's sigmas, boundary ... 0
    result: SearchResult  # the one constrained search

    @property
    def split_step(self) -> int:
        """Steps the high-noise expert runs (a two-stage sampler's end_at_step / start_at_step)."""
        return len(self.high_sigmas) - 1


@dataclass
class ExpertSplit:
    """What a two-expert pipeline's wrapped model carries (`model.expert_split`) for the search."""

    boundary: float  # flow sigma where the second expert takes over
    default_schedule: Callable[[int], Schedule]  # the pipeline's own M-step schedule

    def high_steps(self, steps: int) -> int:
        return default_high_steps(self.default_schedule(steps), self.boundary, steps)


def nearest_onto(times: torch.Tensor, boundary: float, what: str) -> tuple[torch.Tensor, int]:
    """`times` with the interior point nearest the boundary moved onto it, and that point's index."""
    if len(times) < 3:
        raise OptimalStepsError(f"{what} has one step: no point to put on the experts' boundary {boundary:g}")
    times = times.clone()
    index = int(torch.argmin((times[1:-1] - boundary).abs())) + 1
    times[index] = boundary
    if not bool((times[1:] < times[:-1]).all()):
        raise OptimalStepsError(f"{what} cannot hold the experts' boundary {boundary:g} (it runs from "
                                f"{float(times[0]):g} to {float(times[-1]):g} in {len(times) - 1} steps)")
    return times, index


def teacher_through(teacher: Schedule, boundary: float) -> tuple[Schedule, int]:
    """The teacher grid with its point nearest the boundary moved onto it, and that point's index."""
    times, index = nearest_onto(teacher.times, boundary, "the teacher grid (use more teacher steps)")
    return Schedule(times, teacher.process, metadata=dict(teacher.metadata, boundary=boundary)), index


def onto_boundary(schedule: Schedule, boundary: float) -> Schedule:
    """A schedule with a step exactly on the experts' boundary and its split in the metadata: as it is where it
    has one, else with its interior point nearest the boundary moved onto it, recorded as
    metadata["boundary_moved"] = {"step": k, "from": t} (what a baseline becomes on a two-expert pipeline). A
    two-expert schedule for another boundary is refused."""
    if "split_step" in schedule.metadata:
        check_expert_schedule(schedule, boundary)
        return schedule
    metadata = dict(schedule.metadata)
    if boundary in schedule.times.tolist()[1:-1]:
        times = schedule.times
    else:
        times, index = nearest_onto(schedule.times, boundary, f"the {schedule.steps}-step schedule")
        metadata["boundary_moved"] = {"step": index, "from": float(schedule.times[index])}
    moved = Schedule(times, schedule.process, solver=schedule.solver, metadata=metadata)
    moved.metadata.update(expert_split(moved, boundary))
    return moved


def check_expert_schedule(schedule: Schedule, boundary: float) -> None:
    """Refuse a two-expert schedule made for another boundary, or that lost its point on this one."""
    if schedule.metadata.get("boundary") != boundary:
        raise OptimalStepsError(f"the schedule's expert boundary {schedule.metadata.get('boundary')} is not this "
                                f"pipeline's ({boundary:g})")
    expert_split(schedule, boundary)


def boundary_routed(model: Any) -> Any:
    """The model as a two-expert schedule runs it: the step leaving the boundary is the low expert's, the step
    landing there (Heun's corrector included) the high expert's."""
    routed = copy.copy(model)
    routed.boundary_owner = 2
    return routed


def default_high_steps(default: Schedule, boundary: float, steps: int) -> int:
    """How many of `steps` steps the pipeline's own schedule runs with the high-noise expert."""
    share = float((default.times[:-1] >= boundary).double().mean())
    return min(max(1, round(share * steps)), steps - 1)


def expert_split(schedule: Schedule, boundary: float) -> dict[str, Any]:
    """The split of a schedule with a point exactly on the boundary, as a schedule file records it."""
    times = schedule.times.tolist()
    if boundary not in times[1:-1]:
        raise OptimalStepsError(f"the schedule has no step exactly on the experts' boundary {boundary:g}")
    split = times.index(boundary)
    return {"boundary": boundary, "split_step": split, "experts": [1] * split + [2] * (len(times) - 1 - split),
            "high_sigmas": times[:split + 1], "low_sigmas": times[split:]}


def expert_schedule(result: SearchResult, boundary: float) -> ExpertSchedule:
    """The halves of a searched two-expert schedule, recorded in its metadata too."""
    split = expert_split(result.schedule, boundary)
    result.schedule.metadata.update(split)
    return ExpertSchedule(result.schedule, boundary, split["experts"], split["high_sigmas"], split["low_sigmas"],
                          result)


def search_experts(model: Any, noise: torch.Tensor, steps: int, teacher: Schedule, cond: Optional[dict],
                   solver: str = "euler", high_steps: Optional[int] = None, **options: Any) -> ExpertSchedule:
    """Search `steps` steps of which `high_steps` (default: the pipeline's own share) run the high-noise expert
    down to the boundary exactly: one plain DP on `teacher` with its nearest point moved onto the boundary.
    `model` is a two-expert pipeline's wrapped model (`model.expert_split`); `options` go to the search."""
    split = getattr(model, "expert_split", None)
    if split is None:
        raise OptimalStepsError("the two-expert search needs a pipeline with two experts (Wan 2.2 with transformer_2)")
    high_steps = split.high_steps(steps) if high_steps is None else high_steps
    if not 1 <= high_steps < steps:
        raise OptimalStepsError(f"high_steps must be between 1 and {steps - 1} for {steps} steps, got {high_steps}")
    grid, index = teacher_through(teacher, split.boundary)
    if not (high_steps <= index and steps - high_steps <= grid.steps - index):
        raise OptimalStepsError("the teacher grid has too few points on one side of the boundary; use more "
                                "teacher steps")
    options = from_flat(options)
    if options.get("method", "dp") not in (None, "dp"):
        raise OptimalStepsError("the two-expert search runs the plain DP (method='dp'): the validated search's "
                                "candidates need not hold the boundary")
    options["method"] = "dp"
    options["dp"] = replace(options.get("dp") or DPOptions(), through=(high_steps, index))
    result = search(boundary_routed(model), noise, steps, solver=solver, cond=cond, teacher_grid=grid, **options)
    return expert_schedule(result, split.boundary)


def expert_schedules(name: str, process: Any, steps: Sequence[int], model: Any = None,
                     noise: Optional[torch.Tensor] = None, cond: Optional[dict] = None, solver: str = "euler",
                     progress: bool = False, high_steps: Optional[int] = None, **options: Any) -> dict[int, Schedule]:
    """`make_schedules` for a two-expert pipeline's wrapped model: `oss` is the two-expert search (`high_steps`
    high-noise steps, default the pipeline's own share; on the model's teacher grid of `teacher_steps`), every
    other name the named schedule put onto the boundary (`onto_boundary`; `high_steps` does not move it)."""
    split = getattr(model, "expert_split", None)
    if split is None:
        raise OptimalStepsError("expert schedules need a pipeline with two experts (Wan 2.2 with transformer_2)")
    if name != "oss":
        made = make_schedules(name, process, steps, model, noise, cond, solver, progress, **options)
        return {m: onto_boundary(schedule, split.boundary) for m, schedule in made.items()}
    check_search_options(options)
    if options.pop("refine", False) or options.pop("refine_budget", None) is not None:
        raise OptimalStepsError("refinement moves the times off the teacher grid, the experts' boundary with "
                                "them: not with a two-expert pipeline")
    if noise is None:
        raise OptimalStepsError("the two-expert search needs the search noise")
    teacher_steps, teacher = options.pop("teacher_steps", 200), options.pop("teacher_grid", None)
    if teacher is None:
        teacher = model_teacher_grid(model, teacher_steps)
    return {m: search_experts(model, noise, m, teacher, cond, solver, high_steps, progress=progress,
                              **options).schedule for m in steps}
