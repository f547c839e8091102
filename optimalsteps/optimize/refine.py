"""Global refinement of a searched schedule, and a coarse-to-fine search that spends fewer model calls.

Refinement. The dynamic program keeps, per cell, the state closest to the teacher there, which is not the
same as the best final output once a solver carries history (DPM-Solver++(2M)), and it only picks teacher
grid points. `refine_schedule` starts from the best of several schedules on the search samples (the DP's
and every baseline's) and moves the M - 1 interior times continuously, off the grid, to minimise the final
error against the teacher's output on the search samples, derivative-free:

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

Coarse-to-fine search. `coarse_to_fine_dp` runs the DP on an evenly spaced sub-grid of the teacher grid
(the teacher runs once, on the full grid, and its states there are reused), then level by level on finer
strides restricted to a band around each chosen point, one band per DP layer, re-centring a band while a
chosen point sits on its edge. A layer then evaluates the model at a handful of source states instead of
about N. It is a heuristic: it need not find the full DP's schedule (docs/refine.md).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.errors import OptimalStepsError
from ..core.models import index_cond, model_process
from ..core.processes import NoiseProcess
from ..core.schedules import Schedule
from ..core.solvers import get_solver, nfe_per_trajectory, sample

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
                target: torch.Tensor, cond: dict | None = None, max_batch: int = 4096) -> tuple[float, int]:
    """(mean squared error of the solver's output on `schedule` against `target`, model evaluations spent),
    sampled in chunks of at most max_batch; the error is averaged over samples and elements, as the DP's cost."""
    total, nfe = 0.0, 0
    for start in range(0, noise.shape[0], max_batch):
        index = torch.arange(start, min(start + max_batch, noise.shape[0]))
        out = sample(model, noise[index], schedule, solver=solver, cond=index_cond(cond, index))
        total += float((out.samples.to(torch.float64) - target[index].to(torch.float64)).pow(2).sum())
        nfe += out.nfe * len(index)
    return total / target[0].numel() / target.shape[0], nfe


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
                                 self.max_batch)
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
    errors agree to `tol` of the start's error."""
    from scipy.optimize import minimize

    start = objective.best_times
    first, last = float(start[0]), float(start[-1])
    x0 = _gap_logits(process, start)
    simplex = np.vstack([x0] + [x0 + SIMPLEX_STEP * row for row in np.eye(len(x0))])
    options = {"initial_simplex": simplex, "adaptive": len(x0) > 4, "xatol": 1e-4,
               "fatol": tol * objective.best_error, "maxfev": 10 ** 9, "maxiter": 10 ** 9}
    minimize(lambda z: objective(_logits_times(process, z, first, last)), x0, method="Nelder-Mead",
             options=options)
    return "converged"


def _coordinate(objective: _Objective, process: NoiseProcess, tol: float, line_evals: int) -> str:
    """Passes of bounded Brent line searches, one interior time at a time between its neighbours, until a
    pass gains less than `tol` (relative)."""
    from scipy.optimize import minimize_scalar

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
        if before - objective.best_error <= tol * before:
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


def refine_schedule(model: Any, noise: torch.Tensor,
                    start_schedules: Schedule | Sequence[Schedule] | Mapping[str, Schedule], solver: str,
                    target: torch.Tensor, budget_nfe: int | None = None, cond: dict | None = None,
                    method: str = "nelder-mead", max_evaluations: int | None = None, tol: float = 1e-3,
                    line_evals: int = LINE_EVALS, max_batch: int = 4096, progress: bool = False,
                    warn: bool = True) -> RefineResult:
    """Refine the best of `start_schedules` (the first is the unrefined one) on the search `noise` [B, ...].

    The objective is the mean squared error of `solver`'s output against `target` (the teacher's output on
    the same noise). It stops when the method has converged (relative `tol`), when the next evaluation would
    exceed `budget_nfe` model calls (per sample state, scoring the starts included), or after
    `max_evaluations` objective evaluations (default without a budget: 40 per interior time).
    A model with `discrete_timesteps = True`, or a budget too small to score the starts and finish one pass,
    is refused (with a warning, if `warn`): the result then holds the unrefined schedule and `message` says why."""
    started = time.perf_counter()
    process = model_process(model)
    solver = get_solver(solver).name
    if method not in METHODS:
        raise OptimalStepsError(f"unknown refinement method {method!r}; known: {', '.join(METHODS)}")
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
    objective = _Objective(model, noise, solver, target, cond, max_batch,
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
        if steps > 1 and objective.best_error > 0:
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


# ---------------------------------------------------------------------------- starts for search


def baseline_starts(model: Any, noise: torch.Tensor, steps: int, solver: str, cond: dict | None = None,
                    max_batch: int = 4096) -> tuple[dict[str, Schedule], int]:
    """Every baseline schedule `optimalsteps.baselines` can make for the model at `steps` steps (closed forms,
    published tables, `dm`, and the searched competitors `gits` / `boss` on the search noise), and the model
    calls the searched ones spent. Names that do not apply to this process or step count are skipped."""
    from ..evaluation.baselines import TABLE_METHODS, make_schedule, schedule_names

    process = model_process(model)
    out, nfe = {}, 0
    for name in schedule_names():
        if name == "oss" or name in TABLE_METHODS:
            continue  # the DP itself, and table names that need a model family
        try:
            schedule = make_schedule(name, process, steps, model=model, noise=noise, cond=cond, solver=solver)
        except OptimalStepsError:
            continue
        out[name] = schedule
        nfe += int(schedule.metadata.get("nfe", 0) or 0)
    return out, nfe


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
    outs, nfe = [], 0
    for start in range(0, extra, max_batch):
        index = torch.arange(start, min(start + max_batch, extra))
        out = sample(model, more[index], teacher, solver=solver, cond=index_cond(more_cond, index))
        outs.append(out.samples)
        nfe += out.nfe * len(index)
    return more, torch.cat(outs), more_cond, nfe


def _joined_cond(cond: dict | None, more: dict | None, batch: int) -> dict | None:
    """The search samples' conditions followed by the extra samples' (rows broadcast from one stay as they are)."""
    if not cond:
        return cond
    out = {}
    for key, value in cond.items():
        per_sample = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1
        out[key] = torch.cat([value, more[key]]) if per_sample else value
    return out


def refine_search_result(model: Any, noise: torch.Tensor, result: Any, solver: str, budget_nfe: int | None = None,
                         cond: dict | None = None, max_batch: int = 4096, progress: bool = False,
                         options: Refinement | bool = True) -> Any:
    """`search(..., refine=...)`: refine the DP schedule of a SearchResult against the teacher's outputs,
    starting from the best of it and every baseline; returns the result with the refined schedule, its
    metadata (`search_nfe`, `refine_nfe`, `nfe` = both, `refine`) and `result.refinement`. The budget covers
    every model call of the refinement: the searched baselines, extra samples' teacher, and the optimiser."""
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
    if message is None and options.baselines and not discrete:
        baselines, spent = baseline_starts(model, noise, dp.steps, solver, cond, max_batch)
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
                                  max_batch=max_batch, progress=progress, warn=options.warn)
    metadata = dict(dp.metadata)
    search_nfe = int(metadata.get("search_nfe", metadata.get("nfe", result.nfe)))
    refine_nfe = refined.nfe + spent
    seconds = time.perf_counter() - started
    metadata.update({"search_nfe": search_nfe, "refine_nfe": refine_nfe, "nfe": search_nfe + refine_nfe,
                     "search_seconds": round(float(metadata.get("search_seconds", 0.0)) + seconds, 4),
                     "refine_seconds": round(seconds, 4)})
    summary = {"start": refined.start, "error_unrefined": refined.error_before, "error_start": refined.error_start,
               "error_refined": refined.error_after, "evaluations": refined.evaluations, "stopped": refined.stopped,
               "budget": budget_nfe, "samples": count, "method": options.method}
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


# ------------------------------------------------------------------------------------ coarse to fine


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


def _restricted(ctx: Any, index: torch.Tensor, cells: torch.Tensor | None = None) -> Any:
    """The DP context on the sub-grid `index` of the teacher grid, reusing the teacher's states there
    (sub-DPs are cheap: they are not checkpointed)."""
    from .search import Teacher

    def rows(store: torch.Tensor | None) -> torch.Tensor | None:
        return None if store is None else store[:, index.to(store.device)]

    teacher = Teacher(rows(ctx.teacher.states), rows(ctx.teacher.x0), ctx.teacher.nfe)
    return replace(ctx, times=ctx.times[index.to(ctx.times.device)], teacher=teacher, nfe=0, cells=cells,
                   checkpointer=None)


def _paths(ctx: Any, traces: torch.Tensor, index: torch.Tensor) -> list[list[int]]:
    """The traced path(s) of a sub-grid DP in teacher-grid indices: one (joint), or every sample's of every
    rank (median)."""
    from . import distributed as dd
    from .search import _trace

    n = len(index) - 1
    tables = list(traces) if ctx.per_sample else [traces]
    local = [[int(index[i]) for i in _trace(t, ctx.steps, n, False)] for t in tables]
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


def coarse_to_fine_dp(ctx: Any, options: CoarseToFine | bool = True):
    """The search's DP, coarse to fine: (traces, cost table, model calls, info) on the full teacher grid,
    as `search` expects of its DP, plus a dict describing the levels.

    The DP runs on `coarse_steps` + 1 evenly spaced teacher grid points; then, level by level, the stride
    drops by `factor` and the DP runs again on bands of half the previous stride either side of each chosen
    point (one band per layer), until the stride is 1. Table cells outside the last band are unreached."""
    from .search import _exact_dp

    options = options if isinstance(options, CoarseToFine) else CoarseToFine()
    n, steps = len(ctx.times) - 1, ctx.steps
    coarse_steps = _check_options(options, steps, n)
    device = ctx.times.device
    if coarse_steps >= n:  # nothing coarser than the grid itself
        traces, table, nfe = _exact_dp(ctx)
        return traces, table, nfe, {"coarse_steps": n, "levels": [], "nfe": [nfe]}
    index = torch.unique(torch.linspace(0, n, coarse_steps + 1, dtype=torch.float64).round().long()).to(device)
    traces, table, nfe = _exact_dp(_restricted(ctx, index))
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
            traces, table, used = _exact_dp(_restricted(ctx, index, cells[:, index.cpu()].to(device)))
            nfe += used
            info["nfe"].append(used)
            paths = _paths(ctx, traces, index)
            if not _on_edge(paths, centres, window, stride, n, steps):
                break
            centres = paths
        info["levels"].append({"stride": stride, "window": window, "rounds": rounds})
        previous = stride
    return (_to_fine(traces, index, n, -1, True), _to_fine(table, index, n, math.inf, False), nfe, info)


def coarse_to_fine_search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200,
                          solver: str = "euler", coarse_steps: int | None = None, window: int | None = None,
                          factor: int = 4, rounds: int = 2, **options: Any) -> Any:
    """`search` with the coarse-to-fine DP (the same teacher, far fewer model calls); `options` go to `search`."""
    from .search import search

    fast = CoarseToFine(coarse_steps, factor, window, rounds)
    return search(model, noise, steps, teacher_steps=teacher_steps, solver=solver, coarse_to_fine=fast, method="dp",
                  **options)
