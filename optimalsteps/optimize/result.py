"""The result of a search: the schedule, how it was found, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.schedules import Schedule


@dataclass
class SearchResult:
    schedule: Schedule
    indices: list[int]  # teacher-grid indices of the schedule, start -> clean end
    per_sample: Optional[list[Schedule]]  # per-sample schedules (median aggregation), else None
    per_sample_indices: Optional[list[list[int]]]
    cost_table: torch.Tensor  # [M+1, N+1] best cost per cell (joint) or [B, M+1, N+1] (per sample); inf = unreachable
    # the DP's recorded final cost, mean over samples: with median aggregation or the reference DP the mean of
    # the per-sample DPs' own best costs, not the error of the returned schedule (that is `error`)
    dp_cost: float
    nfe: int  # model evaluations spent, per sample state, teacher included (not the `error` run)
    teacher_nfe: int
    seconds: float
    teacher: Schedule  # the teacher grid
    teacher_samples: torch.Tensor
    amplitude: dict[str, list[float]] = field(default_factory=dict)  # teacher quantiles per grid index
    refinement: Optional[Any] = None  # the refine.RefineResult of optimalsteps.search(..., refine=...)
    # the returned schedule's realised error: mean squared distance of its outputs on the search noise to
    # the teacher's, in the DP's cost view (metadata `error_nfe` counts its model calls)
    error: float = float("nan")
