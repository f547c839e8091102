"""ComfyUI, library side: what the node pack needs that does not need ComfyUI itself.

ComfyUI's samplers see every model as a data predictor in k-diffusion's sigma: `model(x, sigma, ...)`
returns the guided clean estimate. Under CONST sampling (flow models: SD3, Flux, Wan) the state is
(1 - sigma) x0 + sigma noise, which is this library's flow process with time = sigma; under EPS /
V_PREDICTION sampling (SD1.x, SDXL) it is x0 + sigma noise, the library's VE process up to the
model's largest sigma. This module wraps such a denoiser as a library model, reads the model's sigma
convention, maps ComfyUI's sampler names to library solvers, builds ComfyUI's first state and
converts schedules to and from ComfyUI's SIGMAS. It never imports `comfy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..core.errors import OptimalStepsError
from ..core.processes import FLOW, NoiseProcess, ve_process
from ..core.schedules import Schedule, check_steps, karras, loglinear_interp

# ComfyUI sampler name -> the library solver that takes exactly the same steps
SAMPLER_SOLVERS = {"euler": "euler", "heun": "heun", "dpmpp_2m": "dpmpp2m-sigma"}

# ComfyUI model-sampling mixins whose sampler state is not x0 + sigma noise or the flow state
_UNSUPPORTED_SAMPLING = ("IMG_TO_IMG", "IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY", "COSMOS_RFLOW")
_VE_SAMPLING = ("EPS", "V_PREDICTION_DDPM")


def solver_for_sampler(sampler_name: str) -> str:
    if sampler_name not in SAMPLER_SOLVERS:
        raise OptimalStepsError(f"sampler {sampler_name!r} has no exactly matching solver; "
                                f"choose one of {', '.join(SAMPLER_SOLVERS)}")
    return SAMPLER_SOLVERS[sampler_name]


@dataclass(frozen=True)
class SigmaConvention:
    """A ComfyUI model's sigma convention: its sampler state family and its sigma range."""

    family: str  # "flow" (CONST sampling) or "ve" (EPS / V_PREDICTION: x0 + sigma noise)
    prediction: str  # the model-sampling class the model was built with (for the record)
    sigma_min: float
    sigma_max: float
    shift: Optional[float] = None

    @property
    def process(self) -> NoiseProcess:
        return FLOW if self.family == "flow" else ve_process(self.sigma_max)

    def describe(self) -> str:
        shift = f", shift {self.shift:g}" if self.shift is not None else ""
        return f"{self.family} ({self.prediction}{shift}, sigma {self.sigma_min:.4g}..{self.sigma_max:.4g})"


def sigma_convention(model_sampling: Any) -> SigmaConvention:
    """The convention of a ComfyUI `model_sampling` object, read from its class's mixins (ComfyUI builds
    it as a class deriving from one sampling base and one of CONST / EPS / V_PREDICTION / ...)."""
    names = [cls.__name__ for cls in type(model_sampling).__mro__]
    bad = [n for n in names if n in _UNSUPPORTED_SAMPLING]
    if bad:
        raise OptimalStepsError(f"model sampling {bad[0]} is not supported: its sampler state is neither "
                                f"the flow state nor x0 + sigma noise")
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    shift = getattr(model_sampling, "shift", None)
    shift = float(shift) if shift is not None else None
    if "CONST" in names:
        return SigmaConvention("flow", "CONST", sigma_min, sigma_max, shift)
    for name in ("V_PREDICTION", "EPS", "V_PREDICTION_DDPM"):
        if name in names:
            return SigmaConvention("ve", name, sigma_min, sigma_max, shift)
    raise OptimalStepsError(f"unknown model sampling {type(model_sampling).__name__}: expected a CONST, EPS "
                            f"or V_PREDICTION model")


def teacher_grid(convention: SigmaConvention, teacher_steps: int,
                 percent_to_sigma: Optional[Callable[[float], float]] = None) -> Schedule:
    """The teacher's grid in the model's own terms.

    Flow: uniform in the model's timestep with its shift applied (ComfyUI's `percent_to_sigma`), so a
    shifted model gets its grid where its noise levels are; without that function, uniform in sigma.
    EPS / V: Karras (rho 7) between the model's sigma_max and sigma_min, then 0, as ComfyUI's karras."""
    teacher_steps = check_steps(teacher_steps)
    process = convention.process
    if convention.family == "ve":
        return karras(process, teacher_steps, sigma_min=convention.sigma_min, sigma_max=convention.sigma_max)
    percents = np.linspace(0.0, 1.0, teacher_steps + 1)
    if percent_to_sigma is None:
        sigmas = 1.0 - percents
    else:
        sigmas = np.array([float(percent_to_sigma(float(p))) for p in percents], dtype=np.float64)
    sigmas[0], sigmas[-1] = 1.0, 0.0
    return Schedule(sigmas, process, metadata={"baseline": "comfyui-model-timesteps"})


class ComfyDenoiser:
    """A ComfyUI-style guided denoiser `denoise(x, sigma[B], **extra_args) -> x0` as a library model.

    The library's time is ComfyUI's sigma in both conventions. States that sit at different times are
    sent in groups of one sigma each, as ComfyUI's own samplers call the model (cond timestep ranges,
    ControlNet schedules and patches look at one sigma per call). `before_call` runs before every
    model call (the node raises ComfyUI's interrupt there); `calls` counts them."""

    prediction = "x0"

    def __init__(self, denoise: Callable[..., torch.Tensor], convention: SigmaConvention,
                 extra_args: Optional[dict] = None, dtype: torch.dtype = torch.float32, max_batch: int = 64,
                 before_call: Optional[Callable[[], None]] = None, spec: str = "comfyui"):
        self.denoise = denoise
        self.convention = convention
        self.process = convention.process
        self.extra_args = dict(extra_args or {})
        self.dtype = dtype
        self.max_batch = max(1, int(max_batch))
        self.before_call = before_call
        self.spec = spec
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for value in torch.unique(t):
            rows = (t == value).nonzero().squeeze(1)
            for start in range(0, len(rows), self.max_batch):
                idx = rows[start:start + self.max_batch]
                out[idx] = self._call(x[idx], float(value)).to(x.dtype)
        return out

    def _call(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.before_call is not None:
            self.before_call()
        self.calls += 1
        sigmas = torch.full((x.shape[0],), sigma, dtype=self.dtype, device=x.device)
        return self.denoise(x.to(self.dtype), sigmas, **self.extra_args)


def search_noise(first_state: torch.Tensor, first_sigma: float) -> torch.Tensor:
    """The library noise whose start sigma(t0) * noise is exactly the state ComfyUI built, so that the
    teacher and the search start where ComfyUI's sampler starts (`noise_scaling`, with its
    sqrt(1 + sigma^2) scale at the largest sigma of EPS / V models, its noise scale on flow models)."""
    return first_state.to(torch.promote_types(first_state.dtype, torch.float32)) / float(first_sigma)


def comfy_start_scale(convention: SigmaConvention, first_sigma: float, noise_scale: float = 1.0) -> float:
    """The factor ComfyUI's `noise_scaling` puts on unit noise at `first_sigma` (empty latent)."""
    if convention.family == "flow":
        return first_sigma * noise_scale
    at_max = math.isclose(convention.sigma_max, first_sigma, rel_tol=1e-5) or first_sigma > convention.sigma_max
    return math.sqrt(1.0 + first_sigma ** 2) if at_max else first_sigma


def comfy_sigmas(schedule: Schedule, convention: SigmaConvention) -> torch.Tensor:
    """A schedule as ComfyUI SIGMAS (float32, ending in 0) for a model of this convention, or an
    OptimalStepsError in one line saying why ComfyUI cannot run it as searched."""
    check_runnable(schedule, convention)
    return schedule.to_sigmas().to(torch.float32)


def check_runnable(schedule: Schedule, convention: SigmaConvention) -> None:
    process = schedule.process
    if process.kind == "flow" and convention.family != "flow":
        raise OptimalStepsError(f"this schedule is for a flow model but the model is {convention.describe()}")
    if process.kind != "flow" and convention.family == "flow":
        raise OptimalStepsError(f"this schedule is for a {process.name} model but the model is a flow model")
    sigmas = schedule.to_sigmas()
    if convention.family == "ve" and float(sigmas[0]) > convention.sigma_max * (1 + 1e-5):
        raise OptimalStepsError(f"this schedule starts at sigma {float(sigmas[0]):.4g}, above the model's largest "
                                f"sigma {convention.sigma_max:.4g}: it was searched for another model family")
    start_time = schedule.metadata.get("noise_scale_time")
    if start_time is not None and abs(float(start_time) - float(schedule.times[0])) > 1e-9:
        raise OptimalStepsError("this schedule was searched with a free start (unscaled noise at its first sigma "
                                f"{float(sigmas[0]):.4g}), which ComfyUI cannot run: it scales the noise by the "
                                "first sigma; search it again without free start")


def start_note(schedule: Schedule, convention: SigmaConvention) -> str:
    """One line on how ComfyUI's first state compares with the one the schedule was searched from."""
    if schedule.metadata.get("start") == "comfyui":
        return "searched from ComfyUI's own first state"
    first = float(schedule.to_sigmas()[0])
    ratio = comfy_start_scale(convention, first) / first
    if abs(ratio - 1.0) < 1e-9:
        return "ComfyUI's first state is the one it was searched from"
    return (f"ComfyUI scales the first noise by sqrt(1 + sigma^2), {100 * (ratio - 1):.2g}% more than the "
            "library search assumed; search in ComfyUI for an exact match")


def interpolate_sigmas(sigmas: torch.Tensor, steps: int, floor: float) -> torch.Tensor:
    """ComfyUI's AYS / GITS / OptimalSteps interpolation of a table to `steps`: the table holds M+1
    positive noise levels (the last is the model's smallest, here `floor` in place of the final 0, or the
    continuation of the last ratio where the schedule already reaches `floor`), is interpolated
    log-linearly to steps + 1 values, and its last value set to 0."""
    steps = check_steps(steps)
    table = np.asarray(sigmas, dtype=np.float64).copy()
    if len(table) - 1 == steps:
        return torch.as_tensor(table, dtype=torch.float32)
    if len(table) < 3:
        raise OptimalStepsError("a 1-step schedule has nothing to interpolate between")
    if not (0 < floor < table[-2]):
        # the schedule already reaches the model's smallest sigma: continue its last ratio instead
        floor = table[-2] * table[-2] / table[-3]
    table[-1] = floor
    out = loglinear_interp(table, steps + 1)
    out[-1] = 0.0
    return torch.as_tensor(out, dtype=torch.float32)


def truncate_sigmas(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """ComfyUI's denoise on a schedule table: keep the last round(M * denoise) steps (none at 0)."""
    if not (0.0 <= denoise <= 1.0):
        raise OptimalStepsError(f"denoise must be in [0, 1], got {denoise}")
    if denoise <= 0.0:
        return sigmas[:0]
    keep = round((len(sigmas) - 1) * denoise)
    return sigmas[-(keep + 1):].clone()


def loader_sigmas(schedule: Schedule, convention: SigmaConvention, steps: int = 0,
                  denoise: float = 1.0) -> torch.Tensor:
    """SIGMAS for a saved schedule: as saved (steps 0 or its own count) or interpolated as ComfyUI's
    schedule nodes do, then truncated for `denoise`."""
    sigmas = comfy_sigmas(schedule, convention)
    if steps and steps != schedule.steps:
        sigmas = interpolate_sigmas(sigmas, steps, convention.sigma_min)
    return truncate_sigmas(sigmas, denoise)


def schedule_from_sigmas(sigmas: torch.Tensor, convention: SigmaConvention, **kwargs: Any) -> Schedule:
    return Schedule.from_sigmas(torch.as_tensor(sigmas, dtype=torch.float64), convention.process, **kwargs)
