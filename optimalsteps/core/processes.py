"""Noise processes x_t = alpha(t) x0 + sigma(t) eps, prediction types, and conversions between them.

Every function takes and returns torch tensors. Coefficients are computed in float64 (schedules are
short) and callers cast them to the state dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from .errors import OptimalStepsError, unknown

PREDICTIONS = ("x0", "eps", "v", "velocity")

_VP_BETA_MIN = 0.1
_VP_BETA_MAX = 20.0


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class NoiseProcess:
    """A continuous-time noise process.

    `t_start` is the noisiest time a sampler starts from, `t_clean` the clean end (sigma = 0).
    `kind` is one of "flow", "vp", "ve"; `sigma_max` only matters for "ve".
    """

    kind: str
    t_start: float
    t_clean: float = 0.0
    sigma_max: float = 80.0

    @property
    def name(self) -> str:
        if self.kind == "ve" and self.sigma_max != 80.0:
            return f"ve(sigma_max={self.sigma_max!r})"
        return self.kind

    def alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        if self.kind == "flow":
            return 1.0 - t
        if self.kind == "vp":
            return torch.exp(_vp_log_alpha(t))
        return torch.ones_like(t)

    def sigma(self, t) -> torch.Tensor:
        t = _f64(t)
        if self.kind == "flow":
            return t.clone()
        if self.kind == "vp":
            # sqrt(1 - alpha^2) written with expm1 to stay accurate near t = 0
            return torch.sqrt(-torch.expm1(2.0 * _vp_log_alpha(t)))
        return t.clone()

    def derivatives(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha / dt, d sigma / dt), used for the velocity prediction type."""
        t = _f64(t)
        if self.kind == "flow":
            return -torch.ones_like(t), torch.ones_like(t)
        if self.kind == "vp":
            alpha = self.alpha(t)
            dlog_alpha = -0.5 * t * (_VP_BETA_MAX - _VP_BETA_MIN) - 0.5 * _VP_BETA_MIN
            dalpha = alpha * dlog_alpha
            sigma = self.sigma(t)
            return dalpha, -alpha * dalpha / sigma
        return torch.zeros_like(t), torch.ones_like(t)

    def log_snr(self, t) -> torch.Tensor:
        """lambda(t) = log(alpha / sigma); +inf at the clean end, -inf at the flow start."""
        t = _f64(t)
        if self.kind == "flow":
            return torch.log1p(-t) - torch.log(t)
        if self.kind == "vp":
            log_alpha = _vp_log_alpha(t)
            return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return -torch.log(t)

    def t_from_log_snr(self, lam) -> torch.Tensor:
        lam = _f64(lam)
        if self.kind == "flow":
            return torch.sigmoid(-lam)
        if self.kind == "vp":
            # alpha^2 = sigmoid(2 lambda); solve the quadratic in t of log alpha(t)
            log_alpha = 0.5 * torch.nn.functional.logsigmoid(2.0 * lam)
            d = _VP_BETA_MAX - _VP_BETA_MIN
            b = 0.5 * _VP_BETA_MIN
            # 0.25 d t^2 + b t + log_alpha = 0, positive root in a cancellation-free form
            disc = torch.sqrt(b * b - d * log_alpha)
            return (-2.0 * log_alpha) / (b + disc)
        return torch.exp(-lam)

    @property
    def sigma_ve_max(self) -> float:
        """The largest noise level, sigma / alpha at `t_start` (inf for flow, whose start is pure noise)."""
        return float(self.sigma_ve(torch.tensor(self.t_start, dtype=torch.float64)))

    def sigma_ve(self, t) -> torch.Tensor:
        """sigma / alpha: the k-diffusion / EDM noise level of time t (inf at the flow start)."""
        t = _f64(t)
        if self.kind == "flow":
            return t / (1.0 - t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, sigma_ve) -> torch.Tensor:
        s = _f64(sigma_ve)
        if self.kind == "flow":
            return s / (1.0 + s)
        if self.kind == "ve":
            return s.clone()
        return self.t_from_log_snr(-torch.log(s))


def _vp_log_alpha(t: torch.Tensor) -> torch.Tensor:
    return -0.25 * t * t * (_VP_BETA_MAX - _VP_BETA_MIN) - 0.5 * _VP_BETA_MIN * t


FLOW = NoiseProcess("flow", t_start=1.0)
VP = NoiseProcess("vp", t_start=1.0)
VE = NoiseProcess("ve", t_start=80.0)
PROCESSES = {"flow": FLOW, "vp": VP, "ve": VE}

ProcessLike = Union[str, NoiseProcess]


def ve_process(sigma_max: float) -> NoiseProcess:
    """A variance-exploding process with its own largest sigma (e.g. 14.6 for Stable Diffusion)."""
    if not (sigma_max > 0 and math.isfinite(sigma_max)):
        raise OptimalStepsError(f"sigma_max must be a positive finite number, got {sigma_max}")
    return NoiseProcess("ve", t_start=float(sigma_max), sigma_max=float(sigma_max))


def get_process(process: ProcessLike) -> NoiseProcess:
    if isinstance(process, NoiseProcess):
        return process
    if isinstance(process, str) and process in PROCESSES:
        return PROCESSES[process]
    raise unknown("process", process, PROCESSES)


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise unknown("prediction type", prediction, PREDICTIONS)
    return prediction


def _coefficients(process: NoiseProcess, t, like: torch.Tensor):
    """alpha, sigma, alpha', sigma' at t, shaped to broadcast against `like` ([B, ...])."""
    t = _f64(t)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    shape = (-1,) + (1,) * (like.dim() - 1)
    alpha, sigma = process.alpha(t), process.sigma(t)
    dalpha, dsigma = process.derivatives(t)
    return tuple(c.to(like.dtype).reshape(shape) for c in (alpha, sigma, dalpha, dsigma))


def to_x0_eps(prediction: str, output: torch.Tensor, x: torch.Tensor, t, process: ProcessLike):
    """(x0, eps) implied by a model output of the given prediction type at state x and time t.

    `velocity` means d x_t / dt along the conditional path (alpha' x0 + sigma' eps): flow matching's
    eps - x0 for the flow process. `v` is v-prediction, alpha eps - sigma x0.
    """
    process = get_process(process)
    check_prediction(prediction)
    alpha, sigma, dalpha, dsigma = _coefficients(process, t, x)
    if prediction == "x0":
        x0 = output
        eps = (x - alpha * x0) / sigma
    elif prediction == "eps":
        eps = output
        x0 = (x - sigma * eps) / alpha
    elif prediction == "v":
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * x - sigma * output) / norm
        eps = (sigma * x + alpha * output) / norm
    else:
        det = dsigma * alpha - sigma * dalpha
        x0 = (dsigma * x - sigma * output) / det
        eps = (alpha * output - dalpha * x) / det
    return x0, eps


def from_x0_eps(prediction: str, x0: torch.Tensor, eps: torch.Tensor, t, process: ProcessLike) -> torch.Tensor:
    """The model output of the given prediction type for clean part x0 and noise eps."""
    process = get_process(process)
    check_prediction(prediction)
    alpha, sigma, dalpha, dsigma = _coefficients(process, t, x0)
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    return dalpha * x0 + dsigma * eps


def convert_prediction(output: torch.Tensor, x: torch.Tensor, t, process: ProcessLike, source: str, target: str):
    """Re-express a model output of prediction type `source` as prediction type `target`."""
    x0, eps = to_x0_eps(source, output, x, t, process)
    return from_x0_eps(target, x0, eps, t, process)


def convert_times(times, source: ProcessLike, target: ProcessLike) -> torch.Tensor:
    """Times in `target` with the same log-SNR as `times` in `source`, clamped to the target's range."""
    source, target = get_process(source), get_process(target)
    if source == target:  # exactly: a round trip through log-SNR would add rounding noise (0.9886000000000001)
        return _f64(times).clone().clamp(min=target.t_clean, max=target.t_start)
    lam = source.log_snr(times)
    lam_lo = target.log_snr(torch.tensor(target.t_start, dtype=torch.float64))
    lam = torch.clamp(lam, min=lam_lo)
    out = target.t_from_log_snr(lam)
    out = torch.where(torch.isinf(lam) & (lam > 0), torch.full_like(out, target.t_clean), out)
    return out.clamp(min=target.t_clean, max=target.t_start)


def convert_state(x: torch.Tensor, t, source: ProcessLike, target: ProcessLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The target-process state and time matching state x at time t of the source process (same SNR)."""
    source, target = get_process(source), get_process(target)
    t_target = convert_times(t, source, target)
    scale = (target.alpha(t_target) / source.alpha(t)).to(x.dtype)
    if scale.dim() > 0:
        scale = scale.reshape((-1,) + (1,) * (x.dim() - 1))
    return x * scale, t_target


# ---------------------------------------------------------------- discrete DDPM beta schedules

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiscreteDDPM:
    """A discrete DDPM beta schedule (Stable Diffusion, DiT): integer timesteps 0..T-1 to alpha, sigma."""

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise unknown("beta schedule", self.beta_schedule, BETA_SCHEDULES)

    @property
    def betas(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=0.999)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        """VE noise levels sigma/alpha of timesteps 0..T-1 (increasing)."""
        ac = self.alphas_cumprod
        return torch.sqrt((1 - ac) / ac)

    def alpha_sigma(self, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long)]
        return torch.sqrt(ac), torch.sqrt(1 - ac)

    def timestep_from_sigma(self, sigma_ve) -> torch.Tensor:
        """Fractional timestep of a VE sigma by linear interpolation in log sigma (as diffusers does)."""
        log_sigmas = torch.log(self.sigmas)
        s = torch.log(_f64(sigma_ve).clamp(min=1e-30))
        idx = torch.searchsorted(log_sigmas, s).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        w = ((s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(torch.float64) + w

    def sigma_from_timestep(self, timesteps) -> torch.Tensor:
        """VE sigma of a (possibly fractional) timestep, interpolated in log sigma."""
        t = _f64(timesteps).clamp(0, self.num_train_timesteps - 1)
        log_sigmas = torch.log(self.sigmas)
        lo = torch.floor(t).long().clamp(max=len(log_sigmas) - 2)
        w = t - lo
        return torch.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1])

    def ve_process(self) -> NoiseProcess:
        """The VE process spanning this schedule's noise levels (how samplers see an SD / DiT model)."""
        return ve_process(float(self.sigmas[-1]))
