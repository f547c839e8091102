"""The `Schedule` type, its file format and exports, and the closed-form schedules.

A schedule holds M+1 strictly decreasing native times of one process, from the start (or a later time
after `denoise` truncation) to the clean end. Closed forms are functions `(process, steps, **options)`
in `CLOSED_FORMS`; published tables and searched competitors live in `optimalsteps.baselines`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import OptimalStepsError, unknown
from .io import load_json, write_text
from .processes import FLOW, DiscreteDDPM, NoiseProcess, ProcessLike, convert_times, get_process, ve_process
from .version import __version__

FORMAT = "optimalsteps.schedule.v1"
TIME_DIGITS = 12  # significant digits of the times in a schedule file

# EDM's noise range, used where a process's own start is at infinite noise (the flow start, t = 1)
SIGMA_MIN = 0.002
SIGMA_MAX_FALLBACK = 80.0


def library_version() -> str:
    return __version__


def parse_process(text: str) -> NoiseProcess:
    match = re.fullmatch(r"ve\(sigma_max=([0-9.eE+-]+)\)", text.strip()) if isinstance(text, str) else None
    if match:
        return ve_process(float(match.group(1)))
    return get_process(text)


@dataclass
class Schedule:
    """Strictly decreasing native times (M+1 values for M steps) of `process`, ending at its clean end."""

    times: torch.Tensor
    process: NoiseProcess
    solver: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.process = parse_process(self.process) if isinstance(self.process, str) else get_process(self.process)
        try:
            times = torch.as_tensor(np.asarray(self.times, dtype=np.float64) if not isinstance(self.times, torch.Tensor)
                                    else self.times.detach().to(torch.float64).cpu())
        except (TypeError, ValueError) as exc:
            raise OptimalStepsError(f"schedule times must be numbers: {exc}") from None
        self.times = times.reshape(-1) if times.dim() <= 1 else times
        validate_times(self.times, self.process)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def __len__(self) -> int:
        return len(self.times)

    def __repr__(self) -> str:
        values = ", ".join(f"{v:.4g}" for v in self.times.tolist())
        return f"Schedule(process={self.process.name}, steps={self.steps}, times=[{values}])"

    # ------------------------------------------------------------------ file format

    def to_dict(self) -> dict[str, Any]:
        metadata = {"library_version": library_version(),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        metadata.update(self.metadata)
        return {"format": FORMAT, "process": self.process.name, "times": [readable(v) for v in self.times.tolist()],
                "solver": self.solver, "metadata": _jsonable(metadata)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> "Schedule":
        if not isinstance(data, dict):
            raise OptimalStepsError(f"{source} must hold a JSON object")
        if data.get("format") != FORMAT:
            raise OptimalStepsError(f"{source} is not an {FORMAT} file (format={data.get('format')!r})")
        missing = [key for key in ("process", "times") if key not in data]
        if missing:
            raise OptimalStepsError(f"{source} is missing key(s): {', '.join(missing)}")
        try:
            return cls(data["times"], data["process"], data.get("solver"), dict(data.get("metadata") or {}))
        except OptimalStepsError as exc:
            raise OptimalStepsError(f"{source}: {exc}") from None

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        return cls.from_dict(load_json(path, "schedule file"), source=str(path))

    # ------------------------------------------------------------------ exports

    def to_sigmas(self) -> torch.Tensor:
        """k-diffusion / ComfyUI sigmas: M+1 values ending in 0.

        VE scale sigma/alpha for vp and ve; for flow, ComfyUI's convention for flow models (the flow
        time itself, 1 at the start), since sigma/alpha is infinite there.
        """
        if self.process.kind == "flow":
            return self.times.clone()
        return self.process.sigma_ve(self.times)

    @classmethod
    def from_sigmas(cls, sigmas, process: ProcessLike, **kwargs: Any) -> "Schedule":
        process = get_process(process) if not isinstance(process, str) else parse_process(process)
        sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        times = sigmas.clone() if process.kind == "flow" else process.t_from_sigma_ve(sigmas)
        return cls(times, process, **kwargs)

    def to_flow_sigmas(self) -> torch.Tensor:
        """diffusers FlowMatchEulerDiscreteScheduler `sigmas`: M flow times (no terminal 0) for shift 1."""
        return convert_times(self.times, self.process, FLOW)[:-1]

    def to_timesteps(self, ddpm: DiscreteDDPM | None = None) -> torch.Tensor:
        """Integer DDPM timesteps (M values, the clean end left out) nearest in log sigma."""
        ddpm = ddpm or DiscreteDDPM()
        sigma = self.process.sigma_ve(self.times[:-1])
        return torch.round(ddpm.timestep_from_sigma(sigma)).long()

    @classmethod
    def from_timesteps(cls, timesteps, ddpm: DiscreteDDPM | None = None, process: ProcessLike | None = None,
                       **kwargs: Any) -> "Schedule":
        """The schedule a discrete model runs for integer timesteps (plus the clean end)."""
        ddpm = ddpm or DiscreteDDPM()
        process = get_process(process) if process is not None else ddpm.ve_process()
        sigma = ddpm.sigma_from_timestep(torch.as_tensor(np.asarray(timesteps, dtype=np.float64)))
        times = process.t_from_sigma_ve(sigma).clamp(max=process.t_start)
        return cls(torch.cat([times, torch.tensor([process.t_clean], dtype=torch.float64)]), process, **kwargs)

    # ------------------------------------------------------------------ reshaping

    def interpolate(self, steps: int) -> "Schedule":
        """The same schedule at another step count by log-linear interpolation of its sigmas (as the
        AYS / GITS / OptimalSteps ComfyUI nodes do): the M nonzero sigmas are interpolated in log space
        to `steps` values and the terminal 0 is kept."""
        check_steps(steps)
        sigmas = self.to_sigmas()
        if steps == self.steps:
            return self.with_times(self.times)
        nonzero = sigmas[:-1]
        if len(nonzero) == 1:
            raise OptimalStepsError("a 1-step schedule has nothing to interpolate between")
        new = loglinear_interp(nonzero.numpy(), steps)
        full = np.concatenate([new, [0.0]])
        out = Schedule.from_sigmas(full, self.process, solver=self.solver, metadata=dict(self.metadata))
        out.metadata["interpolated_from_steps"] = self.steps
        return out

    def truncate(self, denoise: float) -> "Schedule":
        """img2img: keep the last round(M * denoise) steps, the low-noise tail (ComfyUI's convention)."""
        if not (0.0 < denoise <= 1.0):
            raise OptimalStepsError(f"denoise must be in (0, 1], got {denoise}")
        keep = max(1, round(self.steps * denoise))
        out = self.with_times(self.times[-(keep + 1):])
        out.metadata["denoise"] = denoise
        return out

    def with_times(self, times) -> "Schedule":
        return Schedule(torch.as_tensor(times, dtype=torch.float64).clone(), self.process, self.solver,
                        dict(self.metadata))

    def in_process(self, process: ProcessLike) -> "Schedule":
        """The same noise levels (matched log-SNR) expressed in another process's time."""
        process = get_process(process)
        out = Schedule(convert_times(self.times, self.process, process), process, self.solver, dict(self.metadata))
        return out


def validate_times(times: torch.Tensor, process: NoiseProcess) -> None:
    if times.dim() != 1 or len(times) < 2:
        raise OptimalStepsError(f"a schedule needs at least 2 times (1 step), got {times.numel()}")
    if not torch.isfinite(times).all():
        raise OptimalStepsError("schedule contains NaN or inf")
    diffs = times[1:] - times[:-1]
    if not (diffs < 0).all():
        bad = int((diffs >= 0).nonzero()[0])
        raise OptimalStepsError(
            f"schedule is not strictly decreasing at position {bad + 1}: {times[bad]:.6g} -> {times[bad + 1]:.6g}"
        )
    lo, hi = process.t_clean, process.t_start
    tol = 1e-9 * max(1.0, abs(hi))
    if times[0] > hi + tol or times[-1] < lo - tol:
        raise OptimalStepsError(
            f"schedule times must lie in [{lo:g}, {hi:g}] for process {process.name}, got "
            f"{float(times[0]):.6g}..{float(times[-1]):.6g}"
        )
    if abs(float(times[-1]) - lo) > tol:
        raise OptimalStepsError(f"schedule must end at the clean end t={lo:g} of process {process.name}, "
                                f"got {float(times[-1]):.6g}")


def check_steps(steps: int) -> int:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise OptimalStepsError(f"steps must be a whole number >= 1, got {steps!r}")
    return int(steps)


def as_schedule(schedule: Any, process: NoiseProcess) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    return Schedule(torch.as_tensor(schedule, dtype=torch.float64), process)


def loglinear_interp(values: np.ndarray, count: int) -> np.ndarray:
    """Interpolate decreasing positive values to `count` values, linearly in log space over [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    xs = np.linspace(0.0, 1.0, len(values))
    ys = np.log(values[::-1])
    new = np.interp(np.linspace(0.0, 1.0, count), xs, ys)
    return np.exp(new)[::-1].copy()


def readable(value: float, digits: int = TIME_DIGITS) -> float:
    """`value` rounded to `digits` significant digits: 0.30000000000000004 (float noise of a conversion) is
    written as 0.3. Twelve digits are far finer than any solver resolves, and keep distinct times distinct."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---------------------------------------------------------------------------------- closed forms
# Each closed form returns M start-to-low times; `_finish` pins the first to the process start (a sampler
# starts from pure noise there) and appends the clean end. Noise levels given as VE sigmas (sigma/alpha)
# map to any process by matched SNR.

def _finish(process: NoiseProcess, times: torch.Tensor, name: str, options: dict) -> Schedule:
    """Schedule from M start-to-low times: the first is pinned to the process start, the clean end appended."""
    times = times.clone()
    times[0] = process.t_start
    full = torch.cat([times, torch.tensor([process.t_clean], dtype=torch.float64)])
    _check_distinct(full, process, name)
    return Schedule(full, process, metadata={"baseline": name, **options})


def _check_distinct(times: torch.Tensor, process: NoiseProcess, name: str) -> None:
    """Times clamped onto the process start (noise levels above its largest) collapse steps: say so."""
    # convert_times clamps noise levels above the process's largest to (about) its start
    clamped = int((times[1:] >= times[:-1] * (1 - 1e-9)).sum())
    if clamped:
        top = process.sigma_ve_max
        raise OptimalStepsError(
            f"{name}: {clamped} of its {len(times) - 1} steps start at or above the largest noise level of process "
            f"{process.name} (sigma {top:.4g}); use fewer steps or other options")


def _sigma_range(process: NoiseProcess, sigma_min: float, sigma_max: float | None) -> tuple[float, float]:
    top = process.sigma_ve_max
    if sigma_max is None:
        sigma_max = top if math.isfinite(top) else SIGMA_MAX_FALLBACK
    lo, hi = float(sigma_min), float(min(sigma_max, top))
    if not (0 < lo < hi):
        raise OptimalStepsError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo:g}, sigma_max={hi:g}")
    return lo, hi


def _from_ve(process: NoiseProcess, sigmas: torch.Tensor) -> torch.Tensor:
    return process.t_from_sigma_ve(sigmas)


def uniform(process: ProcessLike, steps: int) -> Schedule:
    """Uniform in the process's native time."""
    process, steps = get_process(process), check_steps(steps)
    times = torch.linspace(process.t_start, process.t_clean, steps + 1, dtype=torch.float64)
    return Schedule(times, process, metadata={"baseline": "uniform"})


def logsnr(process: ProcessLike, steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float | None = None) -> Schedule:
    """Uniform in log-SNR (k-diffusion's exponential schedule) from sigma_max to sigma_min, then 0."""
    process, steps = get_process(process), check_steps(steps)
    lo, hi = _sigma_range(process, sigma_min, sigma_max)
    sigmas = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    return _finish(process, _from_ve(process, sigmas), "logsnr", {"sigma_min": lo, "sigma_max": hi})


def karras(process: ProcessLike, steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float | None = None,
           rho: float = 7.0) -> Schedule:
    """EDM: sigma_i = (smax^(1/rho) + i/(M-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < M, then 0.

    sigma_max defaults to the process start (80 where that is infinite: flow); times by matched SNR,
    the first pinned to the process start."""
    process, steps = get_process(process), check_steps(steps)
    lo, hi = _sigma_range(process, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _finish(process, _from_ve(process, sigmas), "karras", {"sigma_min": lo, "sigma_max": hi, "rho": rho})


def time_shift(flow_times: torch.Tensor, shift: float | None = None, mu: float | None = None) -> torch.Tensor:
    """SD3's static shift s t / (1 + (s-1) t), or Flux's exponential shift e^mu / (e^mu + 1/t - 1)."""
    t = torch.as_tensor(flow_times, dtype=torch.float64)
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    s = 3.0 if shift is None else float(shift)
    return s * t / (1.0 + (s - 1.0) * t)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent mu, linear in the latent sequence length (1.15 at 1024x1024)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift(process: ProcessLike, steps: int, shift: float | None = 3.0, mu: float | None = None,
          image_seq_len: int | None = None) -> Schedule:
    """Flow times linspace(1, 1/M, M) shifted as SD3 (static `shift`) or Flux (`mu`, or `mu` from the latent
    sequence length `image_seq_len`: 4096 tokens = 1024x1024 gives 1.15), then 0; mapped by SNR for vp / ve."""
    process, steps = get_process(process), check_steps(steps)
    if image_seq_len is not None:
        if mu is not None:
            raise OptimalStepsError("shift: give mu or image_seq_len, not both")
        mu = flux_mu(int(image_seq_len))
    if mu is None and not (shift is not None and shift > 0 and math.isfinite(shift)):
        raise OptimalStepsError(f"shift must be a positive number, got {shift!r}")
    flow = time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1], shift, mu)
    times = convert_times(flow, FLOW, process)
    options = {"mu": mu} if mu is not None else {"shift": shift}
    return _finish(process, times, "shift", options)


def kl_optimal(process: ProcessLike, steps: int, sigma_min: float = SIGMA_MIN,
               sigma_max: float | None = None) -> Schedule:
    """Align Your Steps Thm 3.1 (c = 1): linear in arctan(sigma) from sigma_max to sigma_min, then 0.

    sigma_max defaults to the process's own largest noise level, infinite for flow (arctan = pi/2)."""
    process, steps = get_process(process), check_steps(steps)
    top = process.sigma_ve_max
    hi = top if sigma_max is None else min(float(sigma_max), top)
    if not (0 < sigma_min < hi):
        raise OptimalStepsError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min:g}, sigma_max={hi:g}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    angles = (1 - ramp) * math.atan(hi) + ramp * math.atan(sigma_min)
    sigmas = torch.tan(angles)
    sigmas[0] = hi  # tan(pi/2) is not exactly inf in floating point
    times = _from_ve(process, sigmas) if math.isfinite(hi) else torch.cat(
        [torch.tensor([process.t_start], dtype=torch.float64), _from_ve(process, sigmas[1:])])
    return _finish(process, times, "kl-optimal", {"sigma_min": sigma_min, "sigma_max": hi})


def beta(process: ProcessLike, steps: int, a: float = 0.6, b: float = 0.6, sigma_min: float = SIGMA_MIN) -> Schedule:
    """ComfyUI's beta schedule: Beta(a, b) quantiles of 1 - i/M as fractions of the model's timestep axis, then 0.

    The axis is native time for flow and vp; for ve it is log sigma from sigma_min to the process's largest
    sigma, as ComfyUI spaces the timestep table of continuous-EDM models. ComfyUI rounds the quantiles
    onto a 1000-entry table and drops repeats; here time is continuous, so no rounding is needed."""
    from scipy.stats import beta as beta_dist  # scipy.stats takes a third of a second to import: only here

    process, steps = get_process(process), check_steps(steps)
    quantiles = torch.as_tensor(beta_dist.ppf(1.0 - np.linspace(0.0, 1.0, steps, endpoint=False), a, b),
                                dtype=torch.float64)
    options = {"alpha": a, "beta": b}
    if process.kind == "ve":
        lo, hi = _sigma_range(process, sigma_min, None)
        times = _from_ve(process, torch.exp(math.log(lo) + quantiles * (math.log(hi) - math.log(lo))))
        options["sigma_min"] = lo
    else:
        times = process.t_clean + quantiles * (process.t_start - process.t_clean)
    return _finish(process, times, "beta", options)


def cosine(process: ProcessLike, steps: int) -> Schedule:
    """Uniform steps in the time of the cosine noise schedule (alpha = cos(pi u/2), sigma = sin(pi u/2)),
    mapped by SNR: lambda(u) = -log tan(pi u / 2), from the process start down to u = 0."""
    process, steps = get_process(process), check_steps(steps)
    lam_start = float(process.log_snr(torch.tensor(process.t_start, dtype=torch.float64)))
    u_start = 1.0 if lam_start == -math.inf else 2.0 / math.pi * math.atan(math.exp(-lam_start))
    u = torch.linspace(u_start, 0.0, steps + 1, dtype=torch.float64)[:-1]
    lam = -torch.log(torch.tan(math.pi * u / 2))
    times = process.t_from_log_snr(lam)
    return _finish(process, times, "cosine", {})


CLOSED_FORMS: dict[str, Callable[..., Schedule]] = {
    "uniform": uniform,
    "logsnr": logsnr,
    "karras": karras,
    "shift": shift,
    "beta": beta,
    "kl-optimal": kl_optimal,
    "cosine": cosine,
}


def closed_form(name: str, process: ProcessLike, steps: int, **options: Any) -> Schedule:
    if name not in CLOSED_FORMS:
        raise unknown("schedule", name, CLOSED_FORMS)
    return CLOSED_FORMS[name](process, steps, **options)
