"""Global refinement of a searched schedule, off the teacher grid.

Refinement. The dynamic program keeps, per cell, the state closest to the teacher there, which is not the
same as the best final output once a solver carries history (DPM-Solver++(2M)), and it only picks teacher
grid points. `refine_schedule` starts from the best of several schedules on the search samples (the DP's
and every baseline's) and moves the M - 1 interior times continuously, off the grid, to minimise the
objective (optimize/objectives.py: "mse", the default, "log" or "tail") of the per-sample final errors
against the teacher's output on the search samples, derivative-free:

- `nelder-mead` (default): scipy's Nelder-Mead on the logits of the gaps between consecutive times;
- `coordinate`: passes over the interior times, each a bounded Brent line search (scipy) between its
  two neighbours. Simpler, but slow where the times are coupled (multistep solvers): on a 10-step
  DPM-Solver++(2M) mixture it had gained half as much as Nelder-Mead after the same number of calls.

Times are handled in the unit coordinate u(t) = (A(t_first) - A(t)) / (A(t_first) - A(t_last)) with
A = arctan(sigma / alpha): u runs from 0 at the schedule's first time to 1 at the clean end, is finite for
every process (also at the flow start, where sigma / alpha is infinite), and any increasing u maps back to
strictly decreasing times inside the process's range. Only points actually evaluated are ever returned,
so the result is never worse on the search samples than its best start. The search stops on a budget of
model calls (counted per sample state, as `SearchResult.nfe`) or an evaluation limit. `search(...,
refine=...)` may measure the error on more samples than the search's (`Refinement.samples`): they get
their own teacher run.

"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from tqdm.auto import tqdm

from ..core.errors import OptimalStepsError, unknown
from ..core.models import index_cond, is_broadcast, model_process
from ..core.processes import NoiseProcess
from ..core.schedules import Schedule
from ..core.solvers import get_solver, nfe_per_trajectory, sample
from .objectives import ERROR_FLOOR, aggregate, check_objective, per_sample_error

METHODS = ("nelder-mead", "coordinate")
EVALUATIONS_PER_TIME = 40  # objective evaluations per interior time when no budget is given
LINE_EVALS = 10  # objective evaluations of one coordinate's line search
SIMPLEX_STEP = 0.3  # Nelder-Mead's initial simplex: each gap's logit moved by this much


@dataclass
class RefineResult:
    schedule: Schedule  # the refined schedule (the unrefined one when refinement was refused)
    start: str  # the start it began from: the best of the starts on the search samples
    error_before: float  # the unrefined (first) start's final error on the search samples
    error_start: float  # the chosen start's
    error_after: float  # the returned schedule's
    start_errors: dict[str, float]  # every start's error on the search samples
    nfe: int  # model evaluations, per sample state, scoring the starts included
    evaluations: int  # objective evaluations (schedules sampled on the search noise)
    history: list[tuple[int, float]]  # (nfe so far, best error so far) at every improvement
    stopped: str  # "converged", "budget", "evaluations" (the limit), "nothing to refine" or "refused"
    message: str = ""  # why refinement was refused, if it was
    seconds: float = 0.0

    @property
    def refused(self) -> bool:
        return self.stopped == "refused"


# ------------------------------------------------------------------------------ the unit coordinate


def _angle(process: NoiseProcess, times: torch.Tensor) -> torch.Tensor:
    return torch.atan(process.sigma_ve(times))  # pi/2 at the flow start, 0 at the clean end


def to_unit(process: NoiseProcess, times: torch.Tensor, first: float, last: float) -> torch.Tensor:
    """u(t) in [0, 1]: 0 at time `first`, 1 at time `last`, increasing as t decreases."""
    a0, a1 = _angle(process, torch.tensor([first, last], dtype=torch.float64))
    return (a0 - _angle(process, times)) / (a0 - a1)


def from_unit(process: NoiseProcess, unit: torch.Tensor, first: float, last: float) -> torch.Tensor:
    """The times of unit coordinates strictly inside (0, 1) (the inverse of `to_unit`)."""
    a0, a1 = _angle(process, torch.tensor([first, last], dtype=torch.float64))
    angle = a0 - torch.as_tensor(unit, dtype=torch.float64) * (a0 - a1)
    return process.t_from_sigma_ve(torch.tan(angle)).clamp(min=process.t_clean, max=process.t_start)


def _strictly_decreasing(times: torch.Tensor) -> bool:
    return bool(torch.isfinite(times).all() and (times[1:] < times[:-1]).all())


# ------------------------------------------------------------------------------------ objective


def final_error(model: Any, noise: torch.Tensor, schedule: Schedule | torch.Tensor, solver: str,
                target: torch.Tensor, cond: dict | None = None, max_batch: int = 4096,
                objective: str = "mse") -> tuple[float, int]:
    """(the objective of the per-sample errors of the solver's output on `schedule` against `target`, model
    evaluations spent), sampled in chunks of at most max_batch. "mse" is the error averaged over samples and
    elements, as the plain DP's cost."""
    out = sample(model, noise, schedule, solver=solver, cond=cond, max_batch=max_batch)
    return float(aggregate(per_sample_error(out.samples, target), objective)), out.nfe * noise.shape[0]


def tolerance(objective: str, value: float, tol: float) -> float:
    """The gain below which an objective value counts as converged: `tol` relative for "mse", `tol` absolute
    for the log objectives ("log", "tail"), where a relative change of the errors is an absolute one."""
    return tol * abs(value) if objective == "mse" else tol


def has_error(objective: str, value: float) -> bool:
    """Whether an objective value leaves anything to refine (every error at zero, or at the floor, does not)."""
    floor = 0.0 if objective == "mse" else math.log(ERROR_FLOOR)
    return math.isfinite(value) and value > floor


class _Stop(Exception):
    """Raised inside an optimiser's objective when the next evaluation would exceed the model-call budget
    ("budget") or the evaluation limit ("evaluations")."""


@dataclass
class _Objective:
    """Final error of times on the search samples; counts model calls, keeps the best point seen."""

    model: Any
    noise: torch.Tensor
    solver: str
    target: torch.Tensor
    cond: dict | None
    max_batch: int
    objective: str  # optimize/objectives.py
    budget: int | None  # model calls
    limit: int | None  # objective evaluations
    per_evaluation: int
    bar: Any  # a tqdm progress bar of evaluations
    nfe: int = 0
    evaluations: int = 0
    best_error: float = math.inf
    best_times: Optional[torch.Tensor] = None
    history: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, times: torch.Tensor) -> float:
        if not _strictly_decreasing(times):
            return math.inf  # rounding collapsed two times: not a schedule, costs no model call
        if self.budget is not None and self.nfe + self.per_evaluation > self.budget:
            raise _Stop("budget")
        if self.limit is not None and self.evaluations >= self.limit:
            raise _Stop("evaluations")
        error, nfe = final_error(self.model, self.noise, times, self.solver, self.target, self.cond,
                                 self.max_batch, self.objective)
        self.nfe += nfe
        self.evaluations += 1
        self.bar.update(1)
        if error < self.best_error:
            self.best_error, self.best_times = error, times.clone()
            self.history.append((self.nfe, error))
        return error


# ------------------------------------------------------------------------------------- methods


def _gap_logits(process: NoiseProcess, times: torch.Tensor) -> np.ndarray:
    """The M - 1 free logits of the M gaps in u (the last gap's logit is pinned to 0)."""
    unit = to_unit(process, times, float(times[0]), float(times[-1]))
    gaps = torch.diff(unit).clamp(min=1e-12)
    return (torch.log(gaps[:-1]) - torch.log(gaps[-1])).numpy()


def _logits_times(process: NoiseProcess, logits: np.ndarray, first: float, last: float) -> torch.Tensor:
    """Times from gap logits: any real logits give strictly decreasing times from `first` to `last`."""
    full = torch.cat([torch.as_tensor(logits, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    unit = torch.cumsum(torch.softmax(full, 0), 0)[:-1]
    inner = from_unit(process, unit, first, last)
    return torch.cat([torch.tensor([first], dtype=torch.float64), inner, torch.tensor([last], dtype=torch.float64)])


def _nelder_mead(objective: _Objective, process: NoiseProcess, tol: float) -> str:
    """Nelder-Mead from the best start; stops when the simplex has shrunk (1e-4 in the logits) and its
    objective values agree to `tolerance` of the start's."""
    start = objective.best_times
    first, last = float(start[0]), float(start[-1])
    x0 = _gap_logits(process, start)
    simplex = np.vstack([x0] + [x0 + SIMPLEX_STEP * row for row in np.eye(len(x0))])
    options = {"initial_simplex": simplex, "adaptive": len(x0) > 4, "xatol": 1e-4,
               "fatol": tolerance(objective.objective, objective.best_error, tol), "maxfev": 10 ** 9,
               "maxiter": 10 ** 9}
    minimize(lambda z: objective(_logits_times(process, z, first, last)), x0, method="Nelder-Mead",
             options=options)
    return "converged"


def _coordinate(objective: _Objective, process: NoiseProcess, tol: float, line_evals: int) -> str:
    """Passes of bounded Brent line searches, one interior time at a time between its neighbours, until a
    pass gains less than `tolerance`."""
    steps = len(objective.best_times) - 1
    while True:
        before = objective.best_error
        for i in range(1, steps):
            base = objective.best_times.clone()  # only time i moves while this line is searched
            first, last = float(base[0]), float(base[-1])
            lo, hi = to_unit(process, base[[i - 1, i + 1]], first, last).tolist()
            margin = 1e-3 * (hi - lo)  # keep clear of the neighbours: steps stay strictly positive

            def line(u: float, i: int = i, base: torch.Tensor = base) -> float:
                times = base.clone()
                times[i] = from_unit(process, torch.tensor(u, dtype=torch.float64), first, last)
                return objective(times)

            minimize_scalar(line, bounds=(lo + margin, hi - margin), method="bounded",
                            options={"maxiter": line_evals, "xatol": 1e-4 * (hi - lo)})
        if before - objective.best_error <= tolerance(objective.objective, before, tol):
            return "converged"


def pass_evaluations(method: str, steps: int, line_evals: int = LINE_EVALS) -> int:
    """Objective evaluations in one pass: a line search per interior time (coordinate), or the initial
    simplex (Nelder-Mead: the start and one point per free logit)."""
    if method == "coordinate":
        return (steps - 1) * line_evals
    return steps


# ------------------------------------------------------------------------------------ refinement


def _named(starts: Schedule | Sequence[Schedule] | Mapping[str, Schedule]) -> list[tuple[str, Schedule]]:
    if isinstance(starts, Schedule):
        starts = [starts]
    if isinstance(starts, Mapping):
        return list(starts.items())
    out = []
    for i, s in enumerate(starts):
        name = s.metadata.get("method") or s.metadata.get("baseline") or f"start {i}"
        out.append((str(name), s))
    return out


def _refused(name: str, unrefined: Schedule, message: str) -> RefineResult:
    return RefineResult(unrefined, name, math.nan, math.nan, math.nan, {}, 0, 0, [], "refused", message)


def _check_refine_inputs(process: NoiseProcess, noise: torch.Tensor,
                         start_schedules: Schedule | Sequence[Schedule] | Mapping[str, Schedule],
                         target: torch.Tensor, method: str, budget_nfe: int | None, max_evaluations: int | None,
                         line_evals: int, tol: float) -> list[tuple[str, Schedule]]:
    """The named starts, after checking every input of `refine_schedule`."""
    if method not in METHODS:
        raise unknown("refinement method", method, METHODS)
    starts = _named(start_schedules)
    if not starts:
        raise OptimalStepsError("refinement needs at least one start schedule")
    steps = starts[0][1].steps
    for name, s in starts:
        if s.steps != steps or s.process.name != process.name:
            raise OptimalStepsError(f"start {name!r} has {s.steps} steps on {s.process.name}; expected {steps} "
                                    f"steps on the model's process {process.name}")
        if "noise_scale_time" in s.metadata:
            raise OptimalStepsError(f"start {name!r} starts from noise scaled for another time "
                                    "(--reference-compat); refinement needs a plain schedule")
    if not isinstance(target, torch.Tensor) or target.shape != noise.shape:
        raise OptimalStepsError(f"refinement target must match the noise's shape {tuple(noise.shape)}")
    for what, value in (("refinement budget", budget_nfe), ("max_evaluations", max_evaluations)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise OptimalStepsError(f"{what} must be a whole number >= 1, got {value!r}")
    if line_evals < 3 or not tol >= 0:
        raise OptimalStepsError(f"need line_evals >= 3 and tol >= 0, got {line_evals}, {tol}")
    return starts


def refine_schedule(model: Any, noise: torch.Tensor,
                    start_schedules: Schedule | Sequence[Schedule] | Mapping[str, Schedule], solver: str,
                    target: torch.Tensor, budget_nfe: int | None = None, cond: dict | None = None,
                    method: str = "nelder-mead", max_evaluations: int | None = None, tol: float = 1e-3,
                    line_evals: int = LINE_EVALS, max_batch: int = 4096, progress: bool = False,
                    warn: bool = True, objective: str = "mse") -> RefineResult:
    """Refine the best of `start_schedules` (the first is the unrefined one) on the search `noise` [B, ...].

    It minimises `objective` (optimize/objectives.py; "mse": the mean squared error) of the per-sample errors
    of `solver`'s output against `target` (the teacher's output on the same noise). It stops when the method
    has converged (`tol`: relative for "mse", absolute for the log objectives), when the next evaluation would
    exceed `budget_nfe` model calls (per sample state, scoring the starts included), or after
    `max_evaluations` objective evaluations (default without a budget: 40 per interior time).
    A model with `discrete_timesteps = True`, or a budget too small to score the starts and finish one pass,
    is refused (with a warning, if `warn`): the result then holds the unrefined schedule and `message` says why."""
    started = time.perf_counter()
    process = model_process(model)
    solver = get_solver(solver).name
    check_objective(objective)
    starts = _check_refine_inputs(process, noise, start_schedules, target, method, budget_nfe, max_evaluations,
                                  line_evals, tol)
    steps = starts[0][1].steps

    per_evaluation = noise.shape[0] * nfe_per_trajectory(solver, steps)
    needed = (len(starts) + pass_evaluations(method, steps, line_evals)) * per_evaluation
    refusal = None
    if getattr(model, "discrete_timesteps", False):
        refusal = ("refinement needs a model that can be evaluated at any time, and this one has discrete "
                   "timesteps; the unrefined schedule is kept")
    elif budget_nfe is not None and steps > 1 and budget_nfe < needed:
        refusal = (f"refinement budget of {int(budget_nfe)} model calls is below the {needed} needed to score "
                   f"{len(starts)} start(s) and finish one pass; the unrefined schedule is kept")
    if refusal is not None:
        if warn:
            warnings.warn(refusal, stacklevel=2)
        return _refused(*starts[0], refusal)

    if max_evaluations is None and budget_nfe is None:
        max_evaluations = len(starts) + EVALUATIONS_PER_TIME * max(1, steps - 1)
    objective = _Objective(model, noise, solver, target, cond, max_batch, objective,
                           None if budget_nfe is None else int(budget_nfe), max_evaluations, per_evaluation,
                           tqdm(desc=f"refine ({method})", unit="eval", disable=not progress, leave=False))
    start_errors = {}
    for name, s in starts:
        start_errors[name] = objective(s.times)
    best_name = min(start_errors, key=start_errors.get)
    objective.best_error, objective.best_times = start_errors[best_name], dict(starts)[best_name].times.clone()
    objective.history = [(objective.nfe, objective.best_error)]

    stopped = "nothing to refine"
    try:
        if steps > 1 and has_error(objective.objective, objective.best_error):
            if method == "nelder-mead":
                stopped = _nelder_mead(objective, process, tol)
            else:
                stopped = _coordinate(objective, process, tol, line_evals)
    except _Stop as stop:
        stopped = str(stop)
    finally:
        objective.bar.close()

    unrefined_name, unrefined = starts[0]
    schedule = unrefined.with_times(objective.best_times)
    schedule.solver = solver
    return RefineResult(schedule, best_name, start_errors[unrefined_name], start_errors[best_name],
                        objective.best_error, start_errors, objective.nfe, objective.evaluations,
                        objective.history, stopped, "", time.perf_counter() - started)


def _interpolated_amplitude(result: Any, times: torch.Tensor) -> dict[str, list[float]]:
    """The teacher's amplitude quantiles at off-grid times, linearly interpolated in time."""
    grid = result.teacher.times.numpy()[::-1]
    out = {}
    for key in ("q05", "q95"):
        values = np.asarray(result.amplitude[key], dtype=np.float64)[::-1]
        out[key] = np.interp(times[:-1].numpy(), grid, values).tolist()
    return out


@dataclass(frozen=True)
class Refinement:
    """Options of `search(..., refine=Refinement(...))` (`refine=True` takes these defaults)."""

    samples: int | None = None  # noise samples the final error is measured on; None: the search samples.
    # More are drawn (seed `seed`) and the teacher runs on them: on multimodal data a few samples cannot
    # show when a schedule makes outputs switch modes (docs/refine.md)
    seed: int = 0
    method: str = "nelder-mead"
    max_evaluations: int | None = None
    tol: float = 1e-3
    baselines: bool = True  # also start from every baseline schedule, not only the DP's
    warn: bool = True  # warn when refinement is refused (the CLI prints the reason itself)
    objective: str = "mse"  # what is minimised (optimize/objectives.py); "log": the mean per-sample PSNR

    def __post_init__(self):
        check_objective(self.objective)


REFINE_SEED_OFFSET = 7_000_003  # extra refinement noise is drawn from seed + this, away from other noise


def refinement_samples(model: Any, noise: torch.Tensor, teacher: Schedule, solver: str, count: int, seed: int,
                       cond: dict | None = None, max_batch: int = 4096):
    """(noise, teacher outputs, conditions, model calls) of `count` - B extra refinement samples; their
    conditions repeat the search samples' rows in turn."""
    extra = count - noise.shape[0]
    generator = torch.Generator().manual_seed(int(seed) + REFINE_SEED_OFFSET)
    more = torch.randn((extra,) + tuple(noise.shape[1:]), generator=generator, dtype=torch.float64)
    more = more.to(dtype=noise.dtype, device=noise.device)
    rows = torch.arange(extra) % noise.shape[0]
    more_cond = index_cond(cond, rows) if cond else cond
    out = sample(model, more, teacher, solver=solver, cond=more_cond, max_batch=max_batch)
    return more, out.samples, more_cond, out.nfe * extra


def _joined_cond(cond: dict | None, more: dict | None, batch: int) -> dict | None:
    """The search samples' conditions followed by the extra samples' (rows broadcast from one stay as they are)."""
    if not cond:
        return cond
    out = {}
    for key, value in cond.items():
        out[key] = value if is_broadcast(value) else torch.cat([value, more[key]])
    return out


def refine_search_result(model: Any, noise: torch.Tensor, result: Any, solver: str, budget_nfe: int | None = None,
                         cond: dict | None = None, max_batch: int = 4096, progress: bool = False,
                         options: Refinement | bool = True,
                         more_starts: Callable[[], tuple[dict[str, Schedule], int]] | None = None) -> Any:
    """Refine the DP schedule of a SearchResult against the teacher's outputs, starting from the best of it and
    the schedules `more_starts()` returns with the model calls it spent (the caller's baselines; called only
    when `options.baselines` and refinement can run); returns the result with the refined schedule, its
    metadata (`search_nfe`, `refine_nfe`, `nfe` = both, `refine`) and `result.refinement`. The budget covers
    every model call of the refinement: the starts, extra samples' teacher, and the optimiser."""
    started = time.perf_counter()
    options = options if isinstance(options, Refinement) else Refinement()
    dp = result.schedule
    batch = noise.shape[0]
    count = batch if options.samples is None else int(options.samples)
    if count < batch:
        raise OptimalStepsError(f"refinement samples ({count}) must be at least the search samples ({batch})")
    spent = 0
    starts: dict[str, Schedule] = {"oss": dp}
    discrete = getattr(model, "discrete_timesteps", False)
    message = None
    if result.teacher_samples.shape[0] != batch:
        # under torch.distributed each rank holds only its share of the teacher's outputs
        message = ("refinement is not supported under torch.distributed (each rank holds only its share of the "
                   "teacher's outputs); the unrefined schedule is kept")
    if message is None and options.baselines and not discrete and more_starts is not None:
        baselines, spent = more_starts()
        starts.update(baselines)
    if message is None and budget_nfe is not None and not discrete:
        teacher_cost = (count - batch) * nfe_per_trajectory(solver, result.teacher.steps)
        per_evaluation = count * nfe_per_trajectory(solver, dp.steps)
        needed = spent + teacher_cost + (len(starts) + pass_evaluations(options.method, dp.steps)) * per_evaluation
        if dp.steps > 1 and budget_nfe < needed:
            message = (f"refinement budget of {int(budget_nfe)} model calls is below the {needed} needed to make the "
                       f"baselines, score {len(starts)} starts on {count} samples and finish one pass; the unrefined "
                       "schedule is kept")
    if message is not None:
        if options.warn:
            warnings.warn(message, stacklevel=3)
        refined = _refused("oss", dp, message)
    else:
        target, refine_noise, refine_cond = result.teacher_samples, noise, cond
        if count > batch and not discrete:
            more, more_target, more_cond, used = refinement_samples(model, noise, result.teacher, solver, count,
                                                                    options.seed, cond, max_batch)
            refine_noise = torch.cat([noise, more])
            target = torch.cat([target, more_target.to(target.dtype)])
            refine_cond = _joined_cond(cond, more_cond, batch)
            spent += used
        remaining = None if budget_nfe is None else int(budget_nfe) - spent
        refined = refine_schedule(model, refine_noise, starts, solver, target, remaining, refine_cond,
                                  method=options.method, max_evaluations=options.max_evaluations, tol=options.tol,
                                  max_batch=max_batch, progress=progress, warn=options.warn,
                                  objective=options.objective)
    metadata = dict(dp.metadata)
    search_nfe = int(metadata.get("search_nfe", metadata.get("nfe", result.nfe)))
    refine_nfe = refined.nfe + spent
    seconds = time.perf_counter() - started
    metadata.update({"search_nfe": search_nfe, "refine_nfe": refine_nfe, "nfe": search_nfe + refine_nfe,
                     "search_seconds": round(float(metadata.get("search_seconds", 0.0)) + seconds, 4),
                     "refine_seconds": round(seconds, 4)})
    summary = {"start": refined.start, "error_unrefined": refined.error_before, "error_start": refined.error_start,
               "error_refined": refined.error_after, "evaluations": refined.evaluations, "stopped": refined.stopped,
               "budget": budget_nfe, "samples": count, "method": options.method, "objective": options.objective}
    if refined.refused:
        summary["message"] = refined.message
        schedule = dp.with_times(dp.times)
    else:
        metadata["method"] = "oss-refined"
        schedule = refined.schedule
        if not torch.equal(schedule.times, dp.times):
            metadata["teacher_indices"] = None  # off the teacher grid now; the DP's stay in `dp_indices`
            metadata["dp_indices"] = list(result.indices)
            metadata["calibration"] = _interpolated_amplitude(result, schedule.times)
    metadata["refine"] = summary
    schedule.metadata = metadata
    schedule.solver = solver
    return replace(result, schedule=schedule, nfe=search_nfe + refine_nfe, refinement=refined)
