"""ODE solvers on any strictly decreasing schedule, written once over a data-prediction step.

Every solver step is linear in what it is given: x_next = c_x * x + c_x0 * x0 + c_prev * x0_prev
(and, for Heun, a second linear combination with the model's estimate at the target). The coefficient
functions below are the single definition of each solver's numerics; `sample` and the schedule search
both use them, so a schedule searched for a solver is exactly the one that solver runs.

Times are tensors `[B]` (one per sample), so one call can advance states that sit at different times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .checks import as_noise, check_schedule_arg
from .errors import OptimalStepsError, unknown
from .models import check_cond, index_cond, model_process, predict_x0
from .processes import NoiseProcess
from .schedules import as_schedule


@dataclass(frozen=True)
class Solver:
    name: str
    order: int
    multistep: bool  # carries the previous x0 estimate (DPM-Solver++(2M))
    corrector: bool  # evaluates the model again at the target (Heun)
    description: str
    # the variable a multistep solver's step ratio is measured in: "log_snr" (log alpha/sigma) or
    # "neg_log_sigma" (-log of the k-diffusion / ComfyUI sigma: the flow time for flow, sigma/alpha otherwise)
    step_variable: str = "log_snr"


SOLVERS = {
    "euler": Solver("euler", 1, False, False, "first order, exact for a constant x0 prediction (DDIM)"),
    "heun": Solver("heun", 2, False, True, "EDM/k-diffusion Heun, trapezoid; last step to the clean end is Euler"),
    "dpmpp2m": Solver("dpmpp2m", 2, True, False, "DPM-Solver++(2M), data prediction, steps in log-SNR"),
    "dpmpp2m-sigma": Solver("dpmpp2m-sigma", 2, True, False,
                            "DPM-Solver++(2M) stepping in -log sigma of the k-diffusion sigma (ComfyUI's dpmpp_2m; "
                            "differs from dpmpp2m only on flow)", "neg_log_sigma"),
}


def step_variable(solver: Solver, process: NoiseProcess, t: torch.Tensor) -> torch.Tensor:
    """The variable a multistep solver measures its step ratio in, at times t (float64)."""
    if solver.step_variable == "neg_log_sigma":
        # k-diffusion's sigma: the flow time itself under ComfyUI's CONST sampling, sigma/alpha otherwise
        sigma = process.sigma(t) if process.kind == "flow" else process.sigma_ve(t)
        return -torch.log(sigma)
    return process.log_snr(t)


def get_solver(name: str | Solver) -> Solver:
    if isinstance(name, Solver):
        return name
    if name not in SOLVERS:
        raise unknown("solver", name, SOLVERS)
    return SOLVERS[name]


def nfe_per_trajectory(solver: str | Solver, steps: int) -> int:
    """Model evaluations per sample for `steps` steps ending at the clean end."""
    solver = get_solver(solver)
    return 2 * steps - 1 if solver.corrector else steps


def _as_times(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def _broadcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def update_coefficients(solver: str | Solver, process: NoiseProcess, t: torch.Tensor, t_next: torch.Tensor,
                        t_prev: Optional[torch.Tensor] = None):
    """(c_x, c_x0, c_prev), float64 tensors [B], of the predictor x_next = c_x x + c_x0 x0 + c_prev x0_prev.

    For Euler and Heun's predictor this is DDIM's update; for DPM-Solver++(2M) the second-order
    correction needs the previous step's time `t_prev` (None, or -inf log-SNR, means a first-order step).
    """
    solver = get_solver(solver)
    t = torch.as_tensor(t, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    alpha, sigma = process.alpha(t), process.sigma(t)
    alpha_n, sigma_n = process.alpha(t_next), process.sigma(t_next)
    ratio = sigma_n / sigma
    c_x = ratio
    c_x0 = alpha_n - alpha * ratio
    c_prev = torch.zeros_like(c_x)
    if solver.multistep and t_prev is not None:
        t_prev = torch.as_tensor(t_prev, dtype=torch.float64)
        lam, lam_n, lam_p = (step_variable(solver, process, v) for v in (t, t_next, t_prev))
        second = torch.isfinite(lam_p) & torch.isfinite(lam) & (sigma_n > 0)
        # r = h_prev / h; where not second order the value is unused, keep it finite
        h = torch.where(second, lam_n - lam, torch.ones_like(lam))
        h_prev = torch.where(second, lam - lam_p, torch.ones_like(lam))
        half_inv_r = torch.where(second, 0.5 * h / h_prev, torch.zeros_like(lam))
        c_prev = -c_x0 * half_inv_r
        c_x0 = c_x0 * (1.0 + half_inv_r)
    return c_x, c_x0, c_prev


def heun_coefficients(process: NoiseProcess, t: torch.Tensor, t_next: torch.Tensor):
    """(a_x, a_x0, a_pred, a_x0_pred), float64 [B], of Heun's corrected state
    x_next = a_x x + a_x0 x0 + a_pred x_pred + a_x0_pred x0_pred, where x_pred is the Euler prediction
    at t_next and x0_pred the model's estimate there.

    Flow: trapezoid on the flow state in flow time. VP/VE: trapezoid on y = x/alpha in s = sigma/alpha.
    Only valid where t_next is not the clean end (there Heun takes a plain Euler step).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    if process.kind == "flow":
        half = 0.5 * (t_next - t)
        return 1.0 + half / t, -half / t, half / t_next, -half / t_next
    alpha, alpha_n = process.alpha(t), process.alpha(t_next)
    s, s_n = process.sigma_ve(t), process.sigma_ve(t_next)
    half = 0.5 * (s_n - s)
    # y'' = y + half ((y - x0)/s + (y_pred - x0_pred)/s_n), then x'' = alpha_n y''
    return (alpha_n / alpha) * (1.0 + half / s), -alpha_n * half / s, half / s_n, -alpha_n * half / s_n


def combine(coefficients, tensors, like: torch.Tensor) -> torch.Tensor:
    """sum_i c_i * tensor_i with per-sample coefficients; zero coefficients skip their tensor."""
    out = torch.zeros_like(like)
    for c, x in zip(coefficients, tensors):
        if x is None or not bool(torch.any(c != 0)):
            continue
        out = out + _broadcast(c, like).to(like.device) * x
    return out


@dataclass
class StepOutput:
    x: torch.Tensor
    x0: torch.Tensor  # the model's estimate at the step's start (the next step's x0_prev)
    nfe: int


def solver_step(solver: str | Solver, model: Any, x: torch.Tensor, t, t_next, x0: Optional[torch.Tensor] = None,
                x0_prev: Optional[torch.Tensor] = None, t_prev=None, cond: dict | None = None) -> StepOutput:
    """One step of `solver` from (x, t) to t_next for a batch; x0 is the model's estimate at (x, t) when
    already known, x0_prev / t_prev the previous step's (for the multistep solver)."""
    solver = get_solver(solver)
    process = model_process(model)
    t = _as_times(t, x)
    t_next = _as_times(t_next, x)
    nfe = 0
    if x0 is None:
        x0 = predict_x0(model, x, t, cond)
        nfe += 1
    use_prev = solver.multistep and x0_prev is not None and t_prev is not None
    coeffs = update_coefficients(solver, process, t, t_next, _as_times(t_prev, x) if use_prev else None)
    x_next = combine(coeffs, (x, x0, x0_prev if use_prev else None), x)
    if solver.corrector:
        inner = t_next > process.t_clean
        if bool(inner.all()):
            x0_pred = predict_x0(model, x_next, t_next, cond)
            nfe += 1
            x_next = combine(heun_coefficients(process, t, t_next), (x, x0, x_next, x0_pred), x)
        elif bool(inner.any()):
            idx = inner.nonzero().squeeze(1)
            x0_pred = predict_x0(model, x_next[idx], t_next[idx], index_cond(cond, idx))
            nfe += 1
            corrected = combine(heun_coefficients(process, t[idx], t_next[idx]),
                                (x[idx], x0[idx], x_next[idx], x0_pred), x_next[idx])
            x_next = x_next.index_copy(0, idx, corrected)
    return StepOutput(x_next, x0, nfe)


@dataclass
class SampleResult:
    samples: torch.Tensor
    nfe: int  # model evaluations per trajectory
    seconds: float
    trajectory: list[torch.Tensor] = field(default_factory=list)  # states at each schedule time, if asked


def state_dtype(noise: torch.Tensor) -> torch.dtype:
    """Float32 or better for the state arithmetic, whatever precision the model runs in."""
    return torch.promote_types(noise.dtype, torch.float32) if noise.is_floating_point() else torch.float32


def initial_state(process: NoiseProcess, noise: torch.Tensor, t_start: float) -> torch.Tensor:
    x = noise.to(state_dtype(noise))
    return x * float(process.sigma(torch.tensor(t_start, dtype=torch.float64)))


def sample(model: Any, noise: torch.Tensor, schedule: Any, solver: str = "euler", cond: dict | None = None,
           calibration: Optional[Callable[[torch.Tensor, int, float], torch.Tensor]] = None,
           return_trajectory: bool = False, progress: bool = False, max_batch: int | None = None) -> SampleResult:
    """Integrate from x = sigma(t_start) * noise along `schedule` (a Schedule or a 1-D tensor of times).

    `calibration(x, step_index, t)`, if given, transforms the state before each model call (amplitude
    calibration). NFE is counted per trajectory. `max_batch` samples at most that many trajectories at
    once (chunks of the noise, each with its samples' conditions); the result is the same.
    """
    check_schedule_arg(schedule)
    noise = as_noise(noise, model)
    if max_batch is not None and noise.shape[0] > max_batch:
        return _sample_in_chunks(model, noise, schedule, solver, check_cond(cond, noise.shape[0]), calibration,
                                 return_trajectory, progress, int(max_batch))
    process = model_process(model)
    schedule = as_schedule(schedule, process)
    if schedule.process.name != process.name:
        raise OptimalStepsError(
            f"schedule is for process {schedule.process.name!r} but the model's is {process.name!r}"
        )
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise OptimalStepsError("noise must have shape [B, ...] with B >= 1")
    check_cond(cond, noise.shape[0])
    solver = get_solver(solver)
    times = schedule.times.tolist()
    started = time.perf_counter()
    # a schedule may say its noise is scaled for another time (the released OSS code starts from the raw
    # noise at a later grid point); otherwise the state starts at sigma(first time) * noise
    x = initial_state(process, noise, schedule.metadata.get("noise_scale_time", times[0]))
    trajectory = [x] if return_trajectory else []
    x0_prev, t_prev, nfe = None, None, 0
    steps = range(len(times) - 1)
    for i in tqdm(steps, desc=f"sampling ({solver.name})", disable=not progress, leave=False):
        if calibration is not None:
            x = calibration(x, i, times[i])
        try:
            out = solver_step(solver, model, x, times[i], times[i + 1], x0_prev=x0_prev, t_prev=t_prev, cond=cond)
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"step {i + 1} of {len(times) - 1}: {exc}") from None
        x, x0_prev, t_prev, nfe = out.x, out.x0, times[i], nfe + out.nfe
        if return_trajectory:
            trajectory.append(x)
    return SampleResult(x, nfe, time.perf_counter() - started, trajectory)


def _sample_in_chunks(model: Any, noise: torch.Tensor, schedule: Any, solver: str, cond: dict | None,
                      calibration: Any, return_trajectory: bool, progress: bool, max_batch: int) -> SampleResult:
    """`sample` over chunks of at most max_batch samples, joined."""
    if max_batch < 1:
        raise OptimalStepsError(f"max_batch must be at least 1, got {max_batch}")
    parts = []
    for start in range(0, noise.shape[0], max_batch):
        index = torch.arange(start, min(start + max_batch, noise.shape[0]))
        parts.append(sample(model, noise[index], schedule, solver, index_cond(cond, index), calibration,
                            return_trajectory, progress))
    trajectory = [torch.cat(states) for states in zip(*(p.trajectory for p in parts))]
    return SampleResult(torch.cat([p.samples for p in parts]), parts[0].nfe, sum(p.seconds for p in parts),
                        trajectory)
