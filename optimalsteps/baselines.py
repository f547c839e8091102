"""Baseline schedules: the closed forms, published tables and searched competitors, under one name each."""

from __future__ import annotations

from typing import Any

from .errors import OptimalStepsError
from .processes import ProcessLike, get_process
from .schedules import CLOSED_FORMS, Schedule, check_steps


def schedule_names() -> list[str]:
    return list(CLOSED_FORMS)


def make_schedule(name: str, process: ProcessLike, steps: int, **options: Any) -> Schedule:
    """Any named schedule for `process` at `steps` steps."""
    process, steps = get_process(process), check_steps(steps)
    if name in CLOSED_FORMS:
        return CLOSED_FORMS[name](process, steps, **options)
    raise OptimalStepsError(f"unknown schedule {name!r}; known: {', '.join(schedule_names())}")
