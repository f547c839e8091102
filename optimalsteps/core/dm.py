"""DM (Xue et al. 2024, Accelerating Diffusion Sampling with Optimized Time Steps): the log-SNRs that
minimise a bound on an exponential-integrator solver's error. It needs no model or data, so it lives
in the core beside the closed forms."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from scipy.optimize import LinearConstraint, minimize

from .errors import OptimalStepsError
from .processes import ProcessLike, get_process
from .schedules import SIGMA_MAX_FALLBACK, SIGMA_MIN, Schedule, check_steps
from .solvers import get_solver

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
    started = time.perf_counter()
    process, steps = get_process(process), check_steps(steps)
    solver_def = get_solver(solver)
    order = order if order is not None else (1 if solver_def.order == 1 else 2)
    if order not in (1, 2):
        raise OptimalStepsError(f"dm: order must be 1 or 2, got {order}")
    if init not in ("logsnr", "time"):
        raise OptimalStepsError(f"dm: init must be 'logsnr' or 'time', got {init!r}")
    top = process.sigma_ve_max
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
