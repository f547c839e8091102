"""Parametric schedule families fitted on the search samples: one to three parameters each, chosen with
scipy to minimise an objective (optimize/objectives.py) of the student's final per-sample errors against
the teacher's end. Each evaluation samples the search noise once (M steps), so a fit costs at most
`evaluations` * B * NFE(M) model calls.

- `shift`: the SD3 time shift of uniform flow time, log shift in [log 0.1, log 20];
- `karras`: EDM's rho in [1, 15];
- `beta`: ComfyUI's Beta(a, b) quantiles, a and b in [0.2, 3];
- `blend`: w * log-SNR + (1 - w) * uniform native time, w in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..core.errors import OptimalStepsError
from ..core.models import model_process
from ..core.processes import NoiseProcess
from ..core.schedules import Schedule, beta, karras, logsnr, shift, uniform
from ..core.solvers import nfe_per_trajectory, sample
from .objectives import aggregate, check_objective, per_sample_error


def _blend(process: NoiseProcess, steps: int, w: float) -> Schedule:
    times = w * logsnr(process, steps).times + (1.0 - w) * uniform(process, steps).times
    return Schedule(times, process, metadata={"baseline": "blend", "weight": w})


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[NoiseProcess, int, np.ndarray], Schedule]  # (process, steps, parameters) -> schedule
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    start: tuple[float, ...]  # the library default: where the fit begins


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("shift", lambda p, m, v: shift(p, m, shift=math.exp(v[0])), (math.log(0.1),), (math.log(20.0),),
           (math.log(3.0),)),
    Family("karras", lambda p, m, v: karras(p, m, rho=float(v[0])), (1.0,), (15.0,), (7.0,)),
    Family("beta", lambda p, m, v: beta(p, m, a=float(v[0]), b=float(v[1])), (0.2, 0.2), (3.0, 3.0), (0.6, 0.6)),
    Family("blend", lambda p, m, v: _blend(p, m, float(v[0])), (0.0,), (1.0,), (0.5,)),
)}


@dataclass
class FitResult:
    family: str
    schedule: Schedule
    parameters: list[float]
    score: float  # the objective on the search samples
    evaluations: int
    nfe: int  # model calls, per sample state


def fit_family(name: str, model: Any, noise: torch.Tensor, teacher_end: torch.Tensor, steps: int,
               solver: str = "euler", objective: str = "log", evaluations: int = 12,
               cond: dict | None = None) -> FitResult:
    """Fit family `name` on `noise` [B, ...] against the teacher's outputs there, within `evaluations` samplings."""
    if name not in FAMILIES:
        raise OptimalStepsError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    check_objective(objective)
    if evaluations < 1:
        raise OptimalStepsError(f"a fit needs at least one evaluation, got {evaluations}")
    family, process = FAMILIES[name], model_process(model)
    seen: dict[tuple[float, ...], tuple[float, Schedule | None]] = {}

    def score(values: np.ndarray) -> float:
        values = np.clip(np.asarray(values, dtype=np.float64), family.lower, family.upper)
        key = tuple(float(v) for v in values)
        if key in seen:
            return seen[key][0]
        if len(seen) >= evaluations:  # the budget is spent: scipy sees a wall, not a new evaluation
            return math.inf
        try:
            schedule = family.build(process, steps, values)
            out = sample(model, noise, schedule, solver=solver, cond=cond).samples
            value = float(aggregate(per_sample_error(out, teacher_end), objective))
        except OptimalStepsError:  # parameters the closed form refuses (steps collapsed onto the start)
            schedule, value = None, math.inf
        seen[key] = (value if math.isfinite(value) else math.inf, schedule)
        return seen[key][0]

    _minimise(score, family, evaluations)
    best = min(seen, key=lambda k: seen[k][0])
    value, schedule = seen[best]
    if schedule is None:
        raise OptimalStepsError(f"no {name} schedule with {steps} steps is valid for process {process.name}")
    schedule.metadata.update({"family": name, "parameters": list(best)})
    return FitResult(name, schedule, list(best), value, len(seen),
                     len(seen) * noise.shape[0] * nfe_per_trajectory(solver, steps))


def _minimise(score: Callable[[np.ndarray], float], family: Family, evaluations: int) -> None:
    """Bounded scalar search for one parameter, Nelder-Mead within the box for more; both stop at the budget."""
    from scipy.optimize import minimize, minimize_scalar

    score(np.array(family.start))
    if len(family.lower) == 1:
        minimize_scalar(lambda v: score(np.array([v])), bounds=(family.lower[0], family.upper[0]), method="bounded",
                        options={"maxiter": max(1, evaluations - 1), "xatol": 1e-3})
        return
    minimize(score, np.array(family.start), method="Nelder-Mead", bounds=list(zip(family.lower, family.upper)),
             options={"maxfev": max(1, evaluations - 1), "xatol": 1e-3, "fatol": 1e-9})
