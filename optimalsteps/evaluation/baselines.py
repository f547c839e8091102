"""Every named schedule under one entry point: closed forms, published tables and searched competitors.

- closed forms: `optimalsteps.core.schedules.CLOSED_FORMS` (uniform, logsnr, karras, shift, beta, kl-optimal, cosine)
- published tables (`optimalsteps.core.tables.TABLES`), reached at other step counts by log-linear interpolation of their noise
  levels as the ComfyUI nodes do: Align Your Steps (`ays-sd15`, `ays-sdxl`, `ays-svd`) and the OSS
  authors' own tables (`oss-flux`, `oss-wan`, `oss-chroma`); `ays` / `oss-table` with `family=` also work
- searched competitors, implemented from their papers on the model contract:
  `gits` (Chen et al. 2024), `boss` (Nguyen et al. 2024, the Bellman step-size DP), `dm` (Xue et al. 2024,
  needs no model: `optimalsteps.core.dm`) and `oss` (this library's search, `oss_search`: the DP search of
  `optimalsteps.optimize`, optionally refined from the best of its schedule and every baseline)

`make_schedule(name, process, steps, model=..., noise=...)` builds one; `make_schedules` builds several step
counts at once, sharing a searched method's teacher run.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.dm import dm
from ..core.checks import as_noise, check_optional_int
from ..core.errors import OptimalStepsError, unknown
from ..core.models import draw_noise, model_process
from ..core.processes import NoiseProcess, ProcessLike, get_process
from ..core.schedules import CLOSED_FORMS, Schedule, check_steps, karras, uniform
from ..core.solvers import get_solver, nfe_per_trajectory, update_coefficients
from ..core.tables import TABLE_METHODS, TABLES, families, get_table, table_schedule
from ..optimize.options import FLAT_OPTIONS, Storage, from_flat
from ..optimize.refine import Refinement, refine_search_result
from ..optimize.search import SearchResult, search
from ..optimize.select import plain_dp_calls
from ..optimize.teacher import run_teacher

# --------------------------------------------------------------------------- local-cost DP (GITS, BOSS)

LOCAL_METRICS = ("dev", "l1", "l2", "l2sq")


def line_deviation(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Distance of points [B, J, D] from the straight line through start [B, D] and end [B, D]: [B, J].

    GITS's "dev" measure of how far a state strays from its trajectory's start-to-end chord."""
    chord = end - start
    unit = chord / chord.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    offset = end[:, None, :] - points
    along = (offset * unit[:, None, :]).sum(-1, keepdim=True)
    return (offset - along * unit[:, None, :]).norm(dim=-1)


def local_cost_matrix(model: Any, noise: torch.Tensor, teacher: Schedule, teacher_solver: str = "euler",
                      metric: str = "l2sq", cond: dict | None = None, max_batch: int = 4096) -> np.ndarray:
    """[N+1, N+1] cost of one Euler (DDIM) jump from the teacher's state at grid point i, with the teacher's
    clean estimate there, to grid point j > i, against the teacher's state at j; inf where j <= i.

    Metrics, averaged over samples: "l2sq" sum of squares (BOSS), "l2" / "l1" norms and "dev" (GITS: the
    jump's distance from the start-to-end chord minus the teacher's own at j)."""
    if metric not in LOCAL_METRICS:
        raise unknown("cost metric", metric, LOCAL_METRICS)
    process = model_process(model)
    run = run_teacher(model, noise, teacher, teacher_solver, cond, max_batch=max_batch)
    states = run.states.reshape(run.states.shape[0], run.states.shape[1], -1).to(torch.float64)
    x0 = run.x0.reshape(states.shape).to(torch.float64)
    times = teacher.times
    n = teacher.steps
    cost = np.full((n + 1, n + 1), np.inf)
    start, end = states[:, 0], states[:, -1]
    teacher_dev = line_deviation(states, start, end).mean(0) if metric == "dev" else None
    for i in range(n):
        j = torch.arange(i + 1, n + 1)
        c_x, c_x0, _ = update_coefficients("euler", process, times[i].expand(len(j)), times[j])
        jumps = c_x[None, :, None] * states[:, i:i + 1] + c_x0[None, :, None] * x0[:, i:i + 1]
        diff = jumps - states[:, j]
        if metric == "l2sq":
            row = diff.pow(2).sum(-1).mean(0)
        elif metric == "l2":
            row = diff.norm(dim=-1).mean(0)
        elif metric == "l1":
            row = diff.abs().sum(-1).mean(0)
        else:
            # (the end point lies on the chord: its own deviation is 0)
            row = line_deviation(jumps, start, end).mean(0) - teacher_dev[j]
        cost[i, i + 1:] = row.numpy()
    return cost


def local_dp(cost: np.ndarray, steps: int, coeff: float = 1.0) -> list[int]:
    """Grid indices 0 -> N of the exactly-`steps`-step path minimising
    cost[i0, i1] + coeff * cost[i1, i2] + coeff^2 * cost[i2, i3] + ... (GITS's recursion
    V[j][k] = min_i cost[j][i] + coeff V[i][k-1]; coeff = 1 is BOSS's shortest path). Ties take the lowest index."""
    steps = check_steps(steps)
    n = cost.shape[0] - 1
    if steps > n:
        raise OptimalStepsError(f"steps ({steps}) exceed the teacher grid's {n} steps")
    value = cost[:, n].copy()  # one step left: jump straight to the clean end
    choices = []
    for _ in range(2, steps + 1):
        # the intermediate point may not be the clean end; cost[j, i] is inf for i <= j
        candidates = cost[:, :n] + coeff * value[None, :n]
        choice = np.argmin(candidates, axis=1)
        value = candidates[np.arange(n + 1), choice]
        choices.append(choice)
    path = [0]
    for choice in reversed(choices):
        path.append(int(choice[path[-1]]))
    path.append(n)
    if not np.isfinite(value[0]) or any(b <= a for a, b in zip(path, path[1:])):
        raise OptimalStepsError(f"no {steps}-step path through the cost matrix")
    return path


@dataclass(frozen=True)
class LocalMethod:
    """A local-cost DP method's paper defaults."""

    teacher: Callable[[NoiseProcess, int], Schedule]
    teacher_steps: int
    teacher_solver: str
    metric: str
    coeff: float
    paper: str


LOCAL_METHODS = {
    # GITS defaults (launch.sh): polynomial rho = 7 grid of 61 timestamps, iPNDM teacher (here DPM-Solver++(2M),
    # the library's highest-order multistep solver), metric "dev", coeff 1.15, 256 warm-up samples (here: the
    # noise given)
    "gits": LocalMethod(karras, 60, "dpmpp2m", "dev", 1.15,
                        "Chen et al. 2024, On the Trajectory Regularity of ODE-based Diffusion Sampling"),
    # BOSS defaults: Euler trajectories on a 100-interval uniform grid, summed squared L2, shortest path of K edges
    "boss": LocalMethod(uniform, 100, "euler", "l2sq", 1.0,
                        "Nguyen et al. 2024, Bellman Optimal Stepsize Straightening of Flow-Matching Models"),
}


def local_schedules(name: str, model: Any, noise: torch.Tensor, steps: Sequence[int], cond: dict | None = None,
                    teacher_steps: int | None = None, teacher_solver: str | None = None, metric: str | None = None,
                    coeff: float | None = None, max_batch: int = 4096) -> dict[int, Schedule]:
    """GITS or BOSS schedules for several step counts from one teacher run and cost matrix."""
    method = LOCAL_METHODS[name]
    started = time.perf_counter()
    process = model_process(model)
    n = check_steps(teacher_steps if teacher_steps is not None else method.teacher_steps)
    for m in steps:
        if check_steps(m) > n:
            raise OptimalStepsError(f"{name}: steps ({m}) exceed its teacher grid's {n} steps (teacher_steps)")
    solver = get_solver(teacher_solver or method.teacher_solver).name
    metric = metric or method.metric
    coeff = float(method.coeff if coeff is None else coeff)
    teacher = method.teacher(process, n)
    cost = local_cost_matrix(model, noise, teacher, solver, metric, cond, max_batch)
    shared = time.perf_counter() - started
    out = {}
    for m in steps:
        dp_started = time.perf_counter()
        path = local_dp(cost, m, coeff)
        seconds = shared + time.perf_counter() - dp_started
        out[m] = Schedule(teacher.times[path], process, metadata={
            "baseline": name, "paper": method.paper, "teacher_steps": n, "teacher_solver": solver,
            "teacher_schedule": teacher.metadata.get("baseline"), "metric": metric, "coeff": coeff,
            "teacher_indices": path, "samples": int(noise.shape[0]), "search_seconds": round(seconds, 4),
            "nfe": int(noise.shape[0]) * nfe_per_trajectory(solver, n)})
    return out


# ------------------------------------------------------------------------------------ entry point

SEARCHED = ("oss", "gits", "boss", "dm")
SOLVER_SPECIFIC = ("oss", "dm")  # the schedule depends on the solver it is made for


def schedule_names() -> list[str]:
    """Every name `make_schedule` accepts."""
    return list(CLOSED_FORMS) + list(TABLES) + list(TABLE_METHODS) + list(SEARCHED)


def check_name(name: str) -> str:
    if name in CLOSED_FORMS or name in TABLES or name in TABLE_METHODS or name in SEARCHED:
        return name
    if name.startswith("ays-") or name.startswith("oss-"):
        get_table(name)  # names the missing family
    raise unknown("schedule", name, schedule_names())


_DESCRIPTIONS = {
    "uniform": "uniform in native time",
    "logsnr": "uniform in log-SNR from sigma_max to sigma_min, then 0 (k-diffusion's exponential)",
    "karras": "EDM rho = 7 from sigma_max to sigma_min, then 0 (k-diffusion's get_sigmas_karras)",
    "shift": "SD3 / Flux time shift of uniform flow time (shift=3, or mu= / image_seq_len=)",
    "beta": "ComfyUI's beta schedule: Beta(0.6, 0.6) quantiles of the timestep axis",
    "kl-optimal": "Align Your Steps Thm 3.1: linear in arctan(sigma)",
    "cosine": "uniform in the time of the cosine noise schedule",
    "oss": "Optimal Stepsize Distillation search (optimalsteps.search, the validated choice); needs a model",
    "gits": "GITS, " + LOCAL_METHODS["gits"].paper + "; needs a model",
    "boss": "BOSS, " + LOCAL_METHODS["boss"].paper + "; needs a model",
    "dm": "DM, Xue et al. 2024, Accelerating Diffusion Sampling with Optimized Time Steps (no model needed)",
}


def describe(name: str) -> str:
    """One line about a named schedule."""
    check_name(name)
    if name in TABLES:
        table = TABLES[name]
        who = "Align Your Steps" if table.method == "ays" else "the OSS authors' ComfyUI"
        return f"{who} table for {table.family}, {table.steps} steps ({table.space} levels)"
    if name in TABLE_METHODS:
        return f"{TABLE_METHODS[name]} table; family= one of {', '.join(families(name))}"
    return _DESCRIPTIONS.get(name, name)


def make_schedule(name: str, process: ProcessLike | None, steps: int, model: Any = None,
                  noise: torch.Tensor | None = None, cond: dict | None = None, solver: str = "euler",
                  progress: bool = False, **options: Any) -> Schedule:
    """Any named schedule for `process` (or the model's, when a model is given) at `steps` steps.

    Closed forms, tables and `dm` need only the process; `gits`, `boss` and `oss` search on `model` with
    the search `noise` [B, ...] (drawn from `samples=`, `seed=` if not given) and per-sample `cond`;
    `dm` and `oss` are made for `solver`. `options` go to the method (rho=, shift=, mu=, family=, coeff=,
    teacher_steps=, ...); an unknown one is named."""
    return make_schedules(name, process, [steps], model, noise, cond, solver, progress, **options)[check_steps(steps)]


def make_schedules(name: str, process: ProcessLike | None, steps: Sequence[int], model: Any = None,
                   noise: torch.Tensor | None = None, cond: dict | None = None, solver: str = "euler",
                   progress: bool = False, **options: Any) -> dict[int, Schedule]:
    """`make_schedule` for several step counts; a searched method runs its teacher once for all of them."""
    if not isinstance(name, str):
        raise OptimalStepsError(f"a schedule name must be a string, got {type(name).__name__}")
    check_name(name)
    steps = [check_steps(m) for m in steps]
    process = _resolve_process(name, process, model)
    if name in CLOSED_FORMS:
        function = CLOSED_FORMS[name]
        _check_options(name, function, options)
        return {m: _with_options(name, options, function, process, m, **options) for m in steps}
    if name in TABLES or name in TABLE_METHODS:
        _check_options(name, table_schedule, options)
        return {m: _with_options(name, options, table_schedule, name, process, m, **options) for m in steps}
    if name == "dm":
        _check_options(name, dm, options)
        return {m: _with_options(name, options, dm, process, m, solver=solver, **options) for m in steps}
    if model is None:
        raise OptimalStepsError(f"schedule {name!r} is searched on a model: pass a model (--model)")
    if noise is None:
        noise = draw_noise(model, int(options.pop("samples", 8)), int(options.pop("seed", 0)))
    if name in LOCAL_METHODS:
        _check_options(name, local_schedules, options)
        return local_schedules(name, model, noise, steps, cond, **options)
    check_search_options(options)
    options = from_flat(options)
    return {m: oss_search(model, noise, m, solver=solver, cond=cond, progress=progress, **options).schedule
            for m in steps}


def _with_options(name: str, options: dict, function: Callable[..., Schedule], *args: Any, **kwargs: Any) -> Schedule:
    """A method's schedule; an option value of the wrong type or range is named instead of a deep TypeError."""
    try:
        return function(*args, **kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        if isinstance(exc, OptimalStepsError):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise OptimalStepsError(f"schedule {name!r} cannot use {given}: {exc}") from None


def _resolve_process(name: str, process: ProcessLike | None, model: Any) -> NoiseProcess:
    if model is None:
        if process is None:
            raise OptimalStepsError(f"schedule {name!r} needs a process (flow, vp, ve) or a model")
        return get_process(process)
    own = model_process(model)
    if process is not None and get_process(process).name != own.name:
        raise OptimalStepsError(f"process {get_process(process).name!r} does not match the model's {own.name!r}")
    return own


_POSITIONAL = ("name", "process", "steps", "model", "noise", "cond", "solver", "progress")


def _check_options(name: str, function: Callable[..., Any], options: dict, extra: Sequence[str] = ()) -> None:
    """Name unknown options (instead of a TypeError from deep inside)."""
    allowed = [p for p in inspect.signature(function).parameters if p not in _POSITIONAL] + list(extra)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptimalStepsError(f"schedule {name!r} has no option(s) {', '.join(unknown)}; "
                                f"it takes: {', '.join(allowed) or 'none'}")


# ------------------------------------------------------------------------- the OSS search, refined

REFINE_OPTIONS = ("refine", "refine_budget")


def check_search_options(options: dict) -> None:
    """Name the options the `oss` schedule does not take (its search's, flat or not, and the refinement's)."""
    _check_options("oss", search, options, extra=REFINE_OPTIONS + tuple(FLAT_OPTIONS))


def baseline_starts(model: Any, noise: torch.Tensor, steps: int, solver: str, cond: dict | None = None,
                    max_batch: int = 4096) -> tuple[dict[str, Schedule], int]:
    """Every baseline schedule `make_schedule` can make for the model at `steps` steps (closed forms,
    published tables, `dm`, and the searched competitors `gits` / `boss` on the search noise), and the model
    calls the searched ones spent. Names that do not apply to this process or step count are skipped."""
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


def oss_search(model: Any, noise: torch.Tensor, steps: int, teacher_steps: int = 200, solver: str = "euler",
               cond: dict | None = None, *, refine: Refinement | bool = False, refine_budget: int | None = None,
               **options: Any) -> SearchResult:
    """The OSS search as `optimalsteps.search` offers it: the DP search (`optimalsteps.optimize.search.search`;
    `options` are its keyword options: teacher_grid, dp, storage, checkpointing, progress, seed, callback, method,
    or their flat names, e.g. cost=, aggregate=, objective=, width=),
    then, with `refine` (True or a `Refinement`), the times optimised off the grid on the search samples from
    the best of the DP's schedule and every baseline, within `refine_budget` model calls (docs/refine.md).
    With method "validated" and `refine`, the DP's schedule refined within `refine_budget` calls (default: the
    plain DP's) is one more candidate of the validated choice (its default refinement settings)."""
    check_optional_int(refine_budget, "refine_budget", minimum=0)
    noise = as_noise(noise, model, "search noise")
    options = from_flat(options)  # flat option names (cost=, aggregate=, objective=, ...) are accepted too
    dp, storage = options.get("dp"), options.get("storage") or Storage()
    if refine and dp is not None and dp.reference_compat:
        raise OptimalStepsError("--refine works on the exact DP, not with --reference-compat")
    if refine and options.get("method") is None:
        options["method"] = "dp"
    if refine and options["method"] == "validated":
        # refinement as one more candidate of the validated choice, on a budget of its own (by default the plain
        # DP's model calls); it wins only if it validates better
        calls = refine_budget if refine_budget else plain_dp_calls(noise.shape[0], teacher_steps, steps, solver)
        return search(model, noise, steps, teacher_steps, solver, cond, refine_calls=calls, **options)
    if refine and options["method"] != "dp":
        raise OptimalStepsError("refinement starts from the plain DP's schedule: pass method='dp' (--method dp) "
                                "with it; the validated search chooses among candidates itself")
    result = search(model, noise, steps, teacher_steps, solver, cond, **options)
    if not refine:
        return result
    solver = result.schedule.solver

    def starts() -> tuple[dict[str, Schedule], int]:
        return baseline_starts(model, noise, result.schedule.steps, solver, cond, storage.max_batch)

    return refine_search_result(model, noise, result, solver, refine_budget, cond, storage.max_batch,
                                options.get("progress", False), refine, starts)
