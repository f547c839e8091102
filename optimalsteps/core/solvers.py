"""ODE solvers on any strictly decreasing schedule, written once over a data-prediction step.

Every solver step is linear in what it is given: x_next = c_x * x + c_x0 * x0 + c_prev * x0_prev
(and, for Heun, a second linear combination with the model's estimate at the target; for UniPC, a
correction of the step's start that is linear in the previous start, the previous estimates and the
estimate at the start, see `unic_coefficients`). The coefficient
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
from .models import check_cond, end_of_step, index_cond, model_process, predict_x0
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
    # corrects each step's start with the model's estimate there before stepping (UniPC's UniC), no extra call
    source_corrector: bool = False


SOLVERS = {
    "euler": Solver("euler", 1, False, False, "first order, exact for a constant x0 prediction (DDIM)"),
    "heun": Solver("heun", 2, False, True, "EDM/k-diffusion Heun, trapezoid; last step to the clean end is Euler"),
    "dpmpp2m": Solver("dpmpp2m", 2, True, False, "DPM-Solver++(2M), data prediction, steps in log-SNR"),
    "dpmpp2m-sigma": Solver("dpmpp2m-sigma", 2, True, False,
                            "DPM-Solver++(2M) stepping in -log sigma of the k-diffusion sigma (ComfyUI's dpmpp_2m; "
                            "differs from dpmpp2m only on flow)", "neg_log_sigma"),
    "unipc": Solver("unipc", 3, True, False, "UniPC bh2, solver order 2 (diffusers' UniPCMultistepScheduler): "
                    "the 2M predictor plus the UniC corrector at each step's start (third order, no extra "
                    "model call); last step first order",
                    source_corrector=True),
}


# diffusers' UniPCMultistepScheduler moves a flow sigma of 1 to 1 - 1e-6 (its log-SNR would be -inf), which
# gives the first estimate a real weight in the next steps; the library's unipc does the same so that a
# schedule searched for it is the one the scheduler runs (the scheduler keeps its sigmas in float32, and
# at this point that rounding moves the log-SNR by 1%)
UNIPC_FLOW_MAX = float(torch.tensor(1.0 - 1e-6, dtype=torch.float32))


def unipc_times(process: NoiseProcess, t: torch.Tensor) -> torch.Tensor:
    """Times as UniPC's coefficients see them: a flow time of 1 becomes UNIPC_FLOW_MAX."""
    return t.clamp(max=UNIPC_FLOW_MAX) if process.kind == "flow" else t


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
    """Per-sample coefficients [B] (or per-cell [B, J] against [B, J, D] states) shaped to multiply `like`."""
    if c.dim() > 1:
        return c.to(like.dtype).reshape(tuple(c.shape) + (1,) * (like.dim() - c.dim()))
    return c.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def update_coefficients(solver: str | Solver, process: NoiseProcess, t: torch.Tensor, t_next: torch.Tensor,
                        t_prev: Optional[torch.Tensor] = None):
    """(c_x, c_x0, c_prev), float64 tensors [B], of the predictor x_next = c_x x + c_x0 x0 + c_prev x0_prev.

    For Euler and Heun's predictor this is DDIM's update; for DPM-Solver++(2M) the second-order
    correction needs the previous step's time `t_prev` (None, or -inf log-SNR, means a first-order step).
    UniPC's predictor (UniP-2, B(h) = expm1(-h), rho = 1/2) is algebraically the same update as 2M's;
    for UniPC `x` is the corrected start (see `unic_coefficients`). A step into the clean end is first
    order for both (diffusers' lower_order_final with final_sigmas_type="zero").
    """
    solver = get_solver(solver)
    t = torch.as_tensor(t, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    if solver.source_corrector:
        t, t_next = unipc_times(process, t), unipc_times(process, t_next)
        t_prev = None if t_prev is None else unipc_times(process, torch.as_tensor(t_prev, dtype=torch.float64))
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


def _phi_ratios(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi_2 / phi_1, 2 phi_3 / phi_1) at z = -h: the right-hand side of UniC's B(h) order conditions
    (phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), by their Taylor series near z = 0
    where the recursion cancels."""
    z = -h
    small = z.abs() < 1e-2
    zd = torch.where(small, torch.ones_like(z), z)
    phi1 = torch.expm1(zd) / zd
    phi2 = (phi1 - 1.0) / zd
    phi3 = (phi2 - 0.5) / zd
    phi1 = torch.where(small, 1 + z * (1 / 2 + z * (1 / 6 + z * (1 / 24 + z / 120))), phi1)
    phi2 = torch.where(small, 1 / 2 + z * (1 / 6 + z * (1 / 24 + z * (1 / 120 + z / 720))), phi2)
    phi3 = torch.where(small, 1 / 6 + z * (1 / 24 + z * (1 / 120 + z * (1 / 720 + z / 5040))), phi3)
    return phi2 / phi1, 2.0 * phi3 / phi1


def unic_coefficients(process: NoiseProcess, t_from: torch.Tensor, t: torch.Tensor,
                      t_before: Optional[torch.Tensor] = None):
    """(k_x, k_from, k_before, k_here), float64 [B], of UniPC's corrected state at t (UniC, B(h) = expm1(-h)):
    x_c = k_x x_from + k_from x0_from + k_before x0_before + k_here x0_here.

    x_from is the (corrected) state the last step started from at t_from, x0_from / x0_before the model's
    estimates at t_from / t_before, x0_here its estimate at the predicted state at t. The corrector has the
    order of the step it corrects: first (rho = 1/2) without `t_before` (nan entries too), else second,
    rho from the 2x2 order conditions with r = (lambda_before - lambda_from) / h. A `t_before` at -inf
    log-SNR (the flow start) is the limit r -> -inf: rho_before = 0, rho_here = phi_2 / phi_1.
    """
    t_from = unipc_times(process, torch.as_tensor(t_from, dtype=torch.float64))
    t = unipc_times(process, torch.as_tensor(t, dtype=torch.float64))
    ratio = process.sigma(t) / process.sigma(t_from)
    e = process.alpha(t) - process.alpha(t_from) * ratio  # alpha_t (1 - e^{-h}), exact at a -inf start
    half = 0.5 * e
    k_x, k_from, k_before, k_here = ratio, half, torch.zeros_like(e), half
    if t_before is None:
        return k_x, k_from, k_before, k_here
    t_before = unipc_times(process, torch.as_tensor(t_before, dtype=torch.float64))
    lam_from = process.log_snr(t_from)
    h = process.log_snr(t) - lam_from
    second = ~torch.isnan(t_before) & torch.isfinite(h) & torch.isfinite(lam_from)
    h = torch.where(second, h, torch.ones_like(h))
    r = torch.where(second, (process.log_snr(torch.nan_to_num(t_before, nan=0.5)) - lam_from) / h,
                    -torch.ones_like(h))
    b1, b2 = _phi_ratios(h)
    # R rho = b with R = [[1, 1], [r, 1]]: rho_before = (b1 - b2) / (1 - r), rho_here = b1 - rho_before
    rho_before = (b1 - b2) / (1.0 - r)
    rho_here = b1 - rho_before
    # x_c = x_from-part + e (x0_from + rho_before (x0_before - x0_from) / r + rho_here (x0_here - x0_from))
    k_before2 = e * rho_before / r
    k_from2 = e * (1.0 - rho_before / r - rho_here)
    k_here2 = e * rho_here
    return (k_x, torch.where(second, k_from2, k_from), torch.where(second, k_before2, k_before),
            torch.where(second, k_here2, k_here))


def unic_correction(process: NoiseProcess, x_from: torch.Tensor, x0_from: torch.Tensor,
                    x0_before: Optional[torch.Tensor], t_from: torch.Tensor, t: torch.Tensor,
                    t_before: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, k_here): the part of the corrected state at t known before the model runs there, and the
    weight of the estimate x0_here it still needs: x_c = base + k_here x0_here."""
    k_x, k_from, k_before, k_here = unic_coefficients(process, t_from, t, t_before)
    base = combine((k_x, k_from, k_before), (x_from, x0_from, x0_before), x_from)
    return base, k_here


def corrected_start(x: torch.Tensor, x0: torch.Tensor,
                    correction: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The UniC-corrected state base + k_here x0 (x itself where there is no pending correction)."""
    if correction is None:
        return x
    base, k_here = correction
    return base + _broadcast(k_here, x0).to(x0.device) * x0


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
    # UniPC: (base, k_here) of the correction of x at t_next, applied once the model has run there
    correction: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def solver_step(solver: str | Solver, model: Any, x: torch.Tensor, t, t_next, x0: Optional[torch.Tensor] = None,
                x0_prev: Optional[torch.Tensor] = None, t_prev=None, cond: dict | None = None,
                correction: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> StepOutput:
    """One step of `solver` from (x, t) to t_next for a batch; x0 is the model's estimate at (x, t) when
    already known, x0_prev / t_prev the previous step's (for the multistep solvers), `correction` the
    previous step's pending UniC correction of x (UniPC; None on the first step)."""
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
    start = corrected_start(x, x0, correction) if solver.source_corrector else x
    x_next = combine(coeffs, (start, x0, x0_prev if use_prev else None), x)
    if solver.source_corrector:
        # the corrector at t_next has the order of this step: second where a previous estimate was used
        pending = unic_correction(process, start, x0, x0_prev if use_prev else None, t, t_next,
                                  _as_times(t_prev, x) if use_prev else None)
        return StepOutput(x_next, x0, nfe, pending)
    if solver.corrector:
        inner = t_next > process.t_clean
        if bool(inner.all()):
            x0_pred = predict_x0(end_of_step(model), x_next, t_next, cond)
            nfe += 1
            x_next = combine(heun_coefficients(process, t, t_next), (x, x0, x_next, x0_pred), x)
        elif bool(inner.any()):
            idx = inner.nonzero().squeeze(1)
            x0_pred = predict_x0(end_of_step(model), x_next[idx], t_next[idx], index_cond(cond, idx))
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
    x0_prev, t_prev, nfe, correction = None, None, 0, None
    steps = range(len(times) - 1)
    for i in tqdm(steps, desc=f"sampling ({solver.name})", disable=not progress, leave=False):
        if calibration is not None:
            x = calibration(x, i, times[i])
        try:
            out = solver_step(solver, model, x, times[i], times[i + 1], x0_prev=x0_prev, t_prev=t_prev, cond=cond,
                              correction=correction)
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"step {i + 1} of {len(times) - 1}: {exc}") from None
        x, x0_prev, t_prev, nfe, correction = out.x, out.x0, times[i], nfe + out.nfe, out.correction
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
