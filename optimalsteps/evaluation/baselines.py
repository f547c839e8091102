"""Every named schedule under one entry point: closed forms, published tables and searched competitors.

- closed forms: `optimalsteps.schedules.CLOSED_FORMS` (uniform, logsnr, karras, shift, beta, kl-optimal, cosine)
- published tables (`TABLES`), reached at other step counts by log-linear interpolation of their noise
  levels as the ComfyUI nodes do: Align Your Steps (`ays-sd15`, `ays-sdxl`, `ays-svd`) and the OSS
  authors' own tables (`oss-flux`, `oss-wan`, `oss-chroma`); `ays` / `oss-table` with `family=` also work
- searched competitors, implemented from their papers on the model contract:
  `gits` (Chen et al. 2024), `boss` (Nguyen et al. 2024, the Bellman step-size DP), `dm` (Xue et al. 2024,
  needs no model) and `oss` (this library's search, `optimalsteps.search`)

`make_schedule(name, process, steps, model=..., noise=...)` builds one; `make_schedules` builds several step
counts at once, sharing a searched method's teacher run.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.errors import OptimalStepsError
from ..core.models import model_process
from ..core.processes import FLOW, NoiseProcess, ProcessLike, convert_times, get_process
from ..core.schedules import (CLOSED_FORMS, SIGMA_MAX_FALLBACK, SIGMA_MIN, Schedule, check_steps, karras,
                        loglinear_interp, uniform)
from ..core.solvers import get_solver, nfe_per_trajectory, update_coefficients

# ------------------------------------------------------------------------------- published tables


@dataclass(frozen=True)
class Table:
    """A published schedule: M+1 noise levels, noisiest first, for one model family at its native M steps."""

    method: str  # "ays" or "oss"
    family: str
    levels: tuple[float, ...]  # as published; the last one is replaced by 0 when used
    space: str  # "ve": sigma / alpha (k-diffusion sigmas); "flow": flow-matching time
    pin_start: bool  # whether the first level means "the model's largest noise" (mapped to the process start)
    source: str

    @property
    def name(self) -> str:
        return f"{self.method}-{self.family}"

    @property
    def steps(self) -> int:
        return len(self.levels) - 1


_AYS_SOURCE = ("Align Your Steps (Sabour, Fidler, Kreis, ICML 2024), 10-step tables from the project's how-to page "
               "research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html, as shipped in ComfyUI "
               "comfy_extras/nodes_align_your_steps.py (SD1.5 / SDXL: Stable Diffusion's sigmas at AYS's timesteps)")
_OSS_SOURCE = ("the OSS authors' tables in ComfyUI's OptimalStepsScheduler, comfy_extras/nodes_optimalsteps.py "
               "(PR #7584, April 2025; Chroma added later by others), searched with Euler in flow time")

TABLES: dict[str, Table] = {t.name: t for t in (
    # VE sigmas of Stable Diffusion's discrete VP schedule at AYS's published integer timesteps (SD1.5: 999, 850,
    # 736, 645, 545, 455, 343, 233, 124, 24, 0; SDXL: 999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0), as
    # ComfyUI ships them; AYS's continuous sigmas (diffusers AysSchedules, 3 decimals) differ by at most 1.4%
    Table("ays", "sd15", (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                          0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
          "ve", True, _AYS_SOURCE + "; Stable Diffusion 1.5"),
    Table("ays", "sdxl", (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                          0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
          "ve", True, _AYS_SOURCE + "; Stable Diffusion XL"),
    # Stable Video Diffusion is an EDM (VE) model with sigma_max 700
    Table("ays", "svd", (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
          "ve", True, _AYS_SOURCE + "; Stable Video Diffusion"),
    # flow times; FLUX.1-dev at 1024x1024 (mu = 1.15): its first level 0.9968 is a searched start, not 1
    Table("oss", "flux", (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
          "flow", False, _OSS_SOURCE + "; FLUX.1-dev, 10 steps"),
    # Wan 2.1, searched for time shift 8.0 (the authors' comment)
    Table("oss", "wan", (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96,
                         0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
          "flow", False, _OSS_SOURCE + "; Wan 2.1 at shift 8.0, 20 steps"),
    Table("oss", "chroma", (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931,
                            0.917, 0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501,
                            0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07,
                            0.058, 0.048, 0.001),
          "flow", False, _OSS_SOURCE + "; Chroma, 40 steps"),
)}

# the method-level names that take `family=`
TABLE_METHODS = {"ays": "Align Your Steps", "oss-table": "OSS (ComfyUI OptimalStepsScheduler)"}


def _table_key(method: str) -> str:
    return "ays" if method == "ays" else "oss"


def get_table(name: str, family: str | None = None) -> Table:
    """A table by full name (`ays-sd15`) or by method and family (`ays` or `oss-table`, family="sd15")."""
    if name in TABLE_METHODS:
        method = name
    elif name.startswith("ays-") or name.startswith("oss-"):
        method = "ays" if name.startswith("ays-") else "oss-table"
        own = name.split("-", 1)[1]
        if family is not None and family.lower() != own:
            raise OptimalStepsError(f"{name} is the {own} table; family={family!r} contradicts it")
        family = own
    else:
        raise OptimalStepsError(f"{name!r} is not a published table; known: {', '.join(TABLES)}")
    if family is None:
        raise OptimalStepsError(f"{name} needs a model family (family=...): one of {', '.join(_families(method))}")
    key = f"{_table_key(method)}-{family.lower()}"
    if key not in TABLES:
        raise OptimalStepsError(f"{TABLE_METHODS[method]} has no table for model family {family!r}; "
                                f"it has: {', '.join(_families(method))}")
    return TABLES[key]


def _families(method: str) -> list[str]:
    prefix = _table_key(method) + "-"
    return [t.family for t in TABLES.values() if t.name.startswith(prefix)]


def table_levels(table: Table, steps: int) -> np.ndarray:
    """The table at `steps` steps: its M+1 levels log-linearly interpolated to steps+1 (unchanged at its
    native step count), the last replaced by 0, as the AYS and OptimalSteps ComfyUI nodes do."""
    steps = check_steps(steps)
    levels = np.asarray(table.levels, dtype=np.float64)
    if steps + 1 != len(levels):
        levels = loglinear_interp(levels, steps + 1)
    levels = levels.copy()
    levels[-1] = 0.0
    return levels


def table_schedule(name: str, process: ProcessLike, steps: int, family: str | None = None,
                   pin_start: bool | None = None) -> Schedule:
    """A published table for `process`: its noise levels mapped by matched SNR (VE sigma s has log-SNR -log s,
    flow time t has log((1-t)/t)). `pin_start` (default: the table's own convention, on for AYS whose first
    level is the model's largest sigma) moves the first time to the process start."""
    table = get_table(name, family)
    process = get_process(process)
    levels = torch.as_tensor(table_levels(table, steps))
    if table.space == "flow":
        times = convert_times(levels, FLOW, process)
        above = levels[:-1] >= float(convert_times(torch.tensor(process.t_start), process, FLOW))
    else:
        top = float(process.sigma_ve(torch.tensor(process.t_start, dtype=torch.float64)))
        times = process.t_from_sigma_ve(levels.clamp(max=top))
        above = levels[:-1] >= top
    # levels above the process's largest noise collapse onto its start: only the first may (it is the start)
    if bool(above[1:].any()):
        shown = ", ".join(f"{v:.4g}" for v in levels[:-1][above].tolist())
        raise OptimalStepsError(f"table {table.name} has noise levels above the largest of process {process.name} "
                                f"({shown}); it was made for {'flow' if table.space == 'flow' else 'VE-sigma'} models")
    if table.pin_start if pin_start is None else pin_start:
        times[0] = process.t_start
    times[-1] = process.t_clean
    metadata = {"baseline": table.name, "source": table.source, "native_steps": table.steps,
                "levels": levels.tolist(), "level_space": table.space}
    if steps != table.steps:
        metadata["interpolated_from_steps"] = table.steps
    return Schedule(times, process, metadata=metadata)


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
    from ..optimize.search import run_teacher

    if metric not in LOCAL_METRICS:
        raise OptimalStepsError(f"unknown cost metric {metric!r}; known: {', '.join(LOCAL_METRICS)}")
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


# ------------------------------------------------------------------------------- DM (Xue et al. 2024)

DM_TRUNCATE = 3  # the released optimiser bounds the first steps' errors separately (no cancellation) below this


# the exponential integrator's integrals of e^lambda times polynomials: H0(h) = e^h - 1, H1(h) = h e^h - H0(h)
def _h0(h: float) -> float:
    return np.expm1(h)


def _h1(h: float) -> float:
    return np.exp(h) * h - np.expm1(h)


def dm_objective(lambdas: np.ndarray, order: int = 2, truncate: int = DM_TRUNCATE) -> float:
    """DM's bound on the distance between the exact ODE solution and the solver's, for log-SNRs
    lambda_0 < ... < lambda_N (start to end) of a data-prediction exponential-integrator solver of order
    `order` (1: DDIM / Euler; 2: DPM-Solver++(2M)), lowered to first order at the first and last steps.

    Each step adds the data-prediction errors it uses, weighted by their coefficients J in the scaled
    state x / sigma, with the data error of step n approximated by sigma_n^2 / alpha_n. From step
    `truncate` on, the weighted errors of the same point are summed across steps before the absolute value."""
    lam = np.asarray(lambdas, dtype=np.float64)
    n_steps = len(lam) - 1
    h = np.diff(lam)
    e = np.exp(lam)
    alpha = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))
    sigma = 1.0 / np.sqrt(1.0 + np.exp(2.0 * lam))
    err = sigma ** 2 / alpha
    total = 0.0
    shared = np.zeros(n_steps + 1)
    for s in range(n_steps):
        k = min(order, s + 1, n_steps - s)
        if k == 1:
            total += abs((e[s + 1] - e[s]) * err[s])
            continue
        # second order from points s-1 and s (step h[s], previous step h[s-1])
        j0 = -e[s] * _h1(h[s]) / h[s - 1]
        j1 = e[s] * (_h1(h[s]) + h[s - 1] * _h0(h[s])) / h[s - 1]
        if s >= truncate:
            shared[s - 1] += err[s - 1] * j0
            shared[s] += err[s] * j1
        else:
            total += math.hypot(err[s - 1] * j0, err[s] * j1)
    return float(total + np.abs(shared).sum())


def dm(process: ProcessLike, steps: int, solver: str = "euler", order: int | None = None,
       sigma_min: float = SIGMA_MIN, sigma_max: float | None = None, init: str = "logsnr",
       min_gap: float = 1e-3) -> Schedule:
    """DM: the log-SNRs minimising `dm_objective` by scipy's trust-constr under monotonicity constraints.

    Needs no model or data. The solver sets the order (euler 1, dpmpp2m and heun 2). The bound runs from
    the process start (sigma_max 80 where that is infinite: flow) to sigma_min; the last time is then the
    clean end, where a data-prediction step lands on its clean estimate. `init`: "logsnr" (uniform lambda,
    the paper's pixel-space choice) or "time" (uniform native time, its latent-space one); consecutive
    log-SNRs keep at least `min_gap` apart."""
    from scipy.optimize import LinearConstraint, minimize

    started = time.perf_counter()
    process, steps = get_process(process), check_steps(steps)
    solver_def = get_solver(solver)
    order = order if order is not None else (1 if solver_def.order == 1 else 2)
    if order not in (1, 2):
        raise OptimalStepsError(f"dm: order must be 1 or 2, got {order}")
    if init not in ("logsnr", "time"):
        raise OptimalStepsError(f"dm: init must be 'logsnr' or 'time', got {init!r}")
    top = float(process.sigma_ve(torch.tensor(process.t_start, dtype=torch.float64)))
    hi = (top if math.isfinite(top) else SIGMA_MAX_FALLBACK) if sigma_max is None else min(float(sigma_max), top)
    if not (0 < sigma_min < hi):
        raise OptimalStepsError(f"dm: need 0 < sigma_min < sigma_max, got {sigma_min:g}, {hi:g}")
    lam_start, lam_end = -math.log(hi), -math.log(sigma_min)
    if init == "logsnr":
        lam0 = np.linspace(lam_start, lam_end, steps + 1)
    else:
        t_hi = float(process.t_from_sigma_ve(torch.tensor(hi)))
        t_lo = float(process.t_from_sigma_ve(torch.tensor(sigma_min)))
        lam0 = process.log_snr(torch.linspace(t_hi, t_lo, steps + 1, dtype=torch.float64)).numpy()
    lam = lam0.copy()
    if steps > 1:
        inner = steps - 1
        # rows: lambda_1 - lambda_start, lambda_{i+1} - lambda_i, lambda_end - lambda_{N-1}, each >= min_gap
        matrix = np.zeros((steps, inner))
        bounds = np.full(steps, min_gap)
        matrix[np.arange(inner), np.arange(inner)] = 1.0
        matrix[np.arange(1, steps), np.arange(inner)] -= 1.0
        bounds[0] += lam_start
        bounds[-1] -= lam_end
        constraint = LinearConstraint(matrix, bounds, np.full(steps, np.inf))

        def objective(inner_lam: np.ndarray) -> float:
            return dm_objective(np.concatenate([[lam_start], inner_lam, [lam_end]]), order)

        with warnings.catch_warnings():
            # trust-constr's quasi-Newton update warns on flat stretches of the bound; harmless here
            warnings.simplefilter("ignore", UserWarning)
            result = minimize(objective, lam0[1:-1], method="trust-constr", constraints=[constraint],
                              options={"maxiter": 2000})
        lam[1:-1] = np.maximum.accumulate(result.x)  # the solver may violate the constraints by rounding
    times = process.t_from_log_snr(torch.as_tensor(lam, dtype=torch.float64))
    times[0] = process.t_start
    times[-1] = process.t_clean
    return Schedule(times, process, solver=solver_def.name, metadata={
        "baseline": "dm", "paper": "Xue et al. 2024, Accelerating Diffusion Sampling with Optimized Time Steps",
        "order": order, "init": init, "sigma_min": sigma_min, "sigma_max": hi,
        "bound": dm_objective(lam, order), "bound_init": dm_objective(lam0, order),
        "search_seconds": round(time.perf_counter() - started, 4)})


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
    raise OptimalStepsError(f"unknown schedule {name!r}; known: {', '.join(schedule_names())}")


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
        return f"{TABLE_METHODS[name]} table; family= one of {', '.join(_families(name))}"
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
    check_name(name)
    steps = [check_steps(m) for m in steps]
    process = _resolve_process(name, process, model)
    if name in CLOSED_FORMS:
        function = CLOSED_FORMS[name]
        _check_options(name, function, options)
        return {m: function(process, m, **options) for m in steps}
    if name in TABLES or name in TABLE_METHODS:
        _check_options(name, table_schedule, options)
        return {m: table_schedule(name, process, m, **options) for m in steps}
    if name == "dm":
        _check_options(name, dm, options)
        return {m: dm(process, m, solver=solver, **options) for m in steps}
    if model is None:
        raise OptimalStepsError(f"schedule {name!r} is searched on a model: pass a model (--model)")
    if noise is None:
        from ..core.models import draw_noise

        noise = draw_noise(model, int(options.pop("samples", 8)), int(options.pop("seed", 0)))
    if name in LOCAL_METHODS:
        _check_options(name, local_schedules, options)
        return local_schedules(name, model, noise, steps, cond, **options)
    from ..optimize.search import search

    _check_options(name, search, options)
    return {m: search(model, noise, steps=m, solver=solver, cond=cond, progress=progress, **options).schedule
            for m in steps}


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


def _check_options(name: str, function: Callable[..., Any], options: dict) -> None:
    """Name unknown options (instead of a TypeError from deep inside)."""
    allowed = [p for p in inspect.signature(function).parameters if p not in _POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptimalStepsError(f"schedule {name!r} has no option(s) {', '.join(unknown)}; "
                                f"it takes: {', '.join(allowed) or 'none'}")
