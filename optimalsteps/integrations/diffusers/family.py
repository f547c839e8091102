"""The protocol a pipeline family implements, with the defaults of a flow-matching transformer pipeline that
takes `sigmas` (Flux and its relatives). A family module subclasses `Family`, overrides what differs and
is listed once in `registry.py`.

What a family says:
- which pipelines it is: the denoiser's class (`pipe.transformer` / `pipe.unet`) and the components present;
- its resolution and size rules; its time shift (static, or a `mu` that follows the resolution);
- its guidance and prompt encoding (`encode`), its wrapped model (`build`) and initial latents (`draw`);
- whether its `__call__` takes a custom schedule, and the keyword arguments that make it run one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from ...core.errors import OptimalStepsError
from ...core.processes import FLOW
from ...core.schedules import Schedule, flux_mu
from ...core.schedules import shift as shifted_uniform
from .common import CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_default, call_parameters, device_of
from .prompts import Conditioning, text_conditioning

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


@dataclass
class Request:
    """One call of a pipeline as the family sees it, checked: what to encode and at which size."""

    conditioning: Conditioning
    scale: float  # guidance_scale as the call uses it
    kind: str  # "cfg", "distilled" or "none"
    height: int
    width: int
    frames: Optional[int]
    per_prompt: int  # images_per_prompt
    options: CallOptions
    spec: str
    extras: dict[str, Any] = field(default_factory=dict)  # what a family's encode hands its build


def class_names(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__} if obj is not None else set()


def components_of(pipe: Any) -> dict[str, set[str]]:
    """Component name -> the class names (with bases) of what the pipeline holds there (empty for a part
    loaded as None: its name still says what kind of pipeline it is)."""
    return {name: class_names(value) for name, value in getattr(pipe, "components", {}).items()
            if not isinstance(value, (str, int, float, bool))}


def whole_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


class Family:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how the refusal message lists it
    denoisers: ClassVar[tuple[str, ...]] = ()  # class names of the network (or one of its bases)
    denoiser: ClassVar[str] = "transformer"  # the component holding it
    flow: ClassVar[bool] = True
    custom_schedule: ClassVar[bool] = True  # __call__ takes `sigmas` (or `timesteps`)
    pooled: ClassVar[bool] = False  # prompt embeddings come with pooled ones
    batched_cfg: ClassVar[bool] = False  # negative and positive share one network call
    video: ClassVar[bool] = False
    packed: ClassVar[bool] = True  # latents are packed in 2 x 2 patches [B, seq, 4C]
    steps_set_mu: ClassVar[bool] = False  # mu depends on the number of steps (Flux 2)
    steps_only: ClassVar[bool] = False  # __call__ hands its scheduler only the step count, no sigmas

    # ----------------------------------------------------------------- recognising a pipeline
    def matches(self, components: dict[str, set[str]]) -> bool:
        return bool(components.get(self.denoiser, set()) & set(self.denoisers))

    def variant(self, pipe: Any) -> "Family":
        """The family object for this pipeline: a variant whose call differs (Flux Img2Img), or this one."""
        return self

    def net(self, pipe: Any) -> Any:
        return getattr(pipe, self.denoiser)

    def check_scheduler(self, pipe: Any) -> None:
        scheduler = pipe.scheduler
        name = type(scheduler).__name__
        if not self.flow:
            if getattr(scheduler, "alphas_cumprod", None) is None:
                raise OptimalStepsError(f"{name} has no alphas_cumprod: not a discrete DDPM scheduler")
            return
        flow_sigmas = name == "FlowMatchEulerDiscreteScheduler" or scheduler.config.get("use_flow_sigmas")
        if name not in FLOW_SCHEDULERS or not flow_sigmas:
            raise OptimalStepsError(f"the {self.name} family runs a flow-matching scheduler "
                                    f"(FlowMatchEulerDiscrete, or UniPC / DPM-Solver with use_flow_sigmas), not {name}")

    # ------------------------------------------------------------------------- sizes
    def vae_scale_factor(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8))

    def default_size(self, pipe: Any) -> tuple[int, int]:
        h, w = call_default(pipe, "height"), call_default(pipe, "width")
        if h is not None and w is not None:
            return int(h), int(w)
        size = pipe.default_sample_size * self.vae_scale_factor(pipe)
        return size, size

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        """The size a call asks for before the defaults fill it in (QwenImage Edit: from its image)."""
        return height, width

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        """The size the pipeline really generates for a requested one (Flux Kontext fits it to max_area)."""
        return height, width

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict[str, Optional[int]]:
        return {"multiple": vae_scale_factor * (2 if self.packed else 1)}

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        pixels = self.vae_scale_factor(pipe) * 2
        return (height // pixels) * (width // pixels)

    def num_frames(self, pipe: Any, num_frames: Optional[int]) -> Optional[int]:
        if not self.video:
            if num_frames is not None:
                raise OptimalStepsError(f"num_frames is only for video pipelines, not {type(pipe).__name__}")
            return None
        frames = int(call_default(pipe, "num_frames")) if num_frames is None else num_frames
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        if not whole_number(frames) or frames < 1 or (frames - 1) % temporal:
            raise OptimalStepsError(f"num_frames must be 1 more than a multiple of {temporal}, got {frames!r}")
        return int(frames)

    def expert_boundary(self, pipe: Any) -> Optional[float]:
        """The flow sigma where a second expert network takes over (Wan 2.2); None for one network."""
        return None

    # ---------------------------------------------------------------------- the shift
    def mu(self, pipe: Any, height: int, width: int, steps: Optional[int]) -> float:
        config = pipe.scheduler.config
        return flux_mu(self.image_seq_len(pipe, height, width), config.get("base_image_seq_len", 256),
                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                       config.get("max_shift", 1.15))

    def video_mu(self, pipe: Any, height: int, width: int, steps: Optional[int], frames: Optional[int]) -> float:
        """mu for a call with `frames` frames (None: the call's default); only LTX-2's follows the frame count."""
        return self.mu(pipe, height, width, steps)

    def shift(self, pipe: Any, height: int, width: int, steps: Optional[int] = None,
              frames: Optional[int] = None) -> tuple[float, dict]:
        """(k, settings): the scheduler maps sigma to k sigma / (1 + (k - 1) sigma), with k the static shift,
        e^mu or mu ("linear"); `steps` matters only where mu follows the step count, `frames` where it follows
        the video's length (LTX-2)."""
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting"):
            mu = self.video_mu(pipe, height, width, steps, frames)
            exponential = config.get("time_shift_type", "exponential") == "exponential"
            info = {"mu": mu, "dynamic_shift": True}
            if self.steps_set_mu:
                info["mu_steps"] = steps
            return (math.exp(mu) if exponential else mu), info
        k = config.get("flow_shift", 1.0) if config.get("use_flow_sigmas") else config.get("shift", 1.0)
        return float(k), {"shift": float(k), "dynamic_shift": False}

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        """Set `scheduler` as `pipe(..., num_inference_steps=steps)` sets it: linspace sigmas (the Flux way), or
        the scheduler's own spacing where `steps_only`."""
        if self.steps_only:
            scheduler.set_timesteps(steps)
            return
        mu = self.shift(pipe, height, width, steps)[1].get("mu")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)

    def flow_teacher(self, pipe: Any, steps: int, k: float) -> Schedule:
        """The pipeline's own `steps`-step flow grid under shift k: linspace(1, 1/steps) shifted (the Flux way)."""
        return shifted_uniform(FLOW, steps, shift=k)

    def schedule_timesteps(self, pipe: Any, unshifted: torch.Tensor) -> dict[str, Any]:
        """`timesteps` to hand beside the pre-shift sigmas, where the pipeline gives its network its own (CogView4)."""
        return {}

    def schedule_extras(self, pipe: Any, info: dict, steps: int) -> dict[str, Any]:
        """Keyword arguments besides `sigmas` that pin the pipeline's shift to the one undone."""
        extras: dict[str, Any] = {}
        if info.get("dynamic_shift") and "mu" in call_parameters(pipe):
            extras["mu"] = info["mu"]
        if self.steps_set_mu:
            extras["num_inference_steps"] = steps
        return extras

    # ---------------------------------------------------------------- guidance, prompts
    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "cfg" if scale > CFG_THRESHOLD else "none"

    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        return text_conditioning(pipe, prompts, options.negative_prompt, self.pooled, self.batched_cfg)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        """Refuse options this family cannot reproduce although the pipeline takes them."""
        if options.image is not None:
            raise OptimalStepsError(f"image inputs are not supported for the {self.name} family yet")

    # ------------------------------------------------------------- encoding and model
    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build(self, pipe: Any, request: Request, cond: dict[str, torch.Tensor]) -> tuple[Any, torch.dtype]:
        raise NotImplementedError

    def image_latent_shape(self, pipe: Any, request: Request) -> tuple[int, int, int]:
        """[C, H, W] of unpacked image latents at the request's size."""
        vsf = self.vae_scale_factor(pipe)
        return self.net(pipe).config.in_channels, request.height // vsf, request.width // vsf

    def flow_model(self, model_class: type[PipelineModel], pipe: Any, request: Request, cond: dict[str, torch.Tensor],
                   guidance: Guidance, shape: tuple[int, ...], *args: Any, latents_dtype: Optional[torch.dtype] = None,
                   **kwargs: Any) -> tuple[PipelineModel, torch.dtype]:
        """(model, latents dtype) for `build`: `model_class` over the family's network with the request's spec,
        attention options and the scheduler's num_train_timesteps (`args` / `kwargs` follow those). Without
        `latents_dtype` the latents and the network's inputs take the prompt embeddings' dtype, as the pipeline's do."""
        model = model_class(self.net(pipe), guidance, shape, request.spec, pipe.scheduler.config.num_train_timesteps,
                            request.options.attention_kwargs, *args, **kwargs)
        if latents_dtype is None:
            latents_dtype = model.dtype = cond["prompt_embeds"].dtype
        return model, latents_dtype

    def teacher(self, pipe: Any, grid: Any, options: CallOptions) -> Any:
        """The teacher run for a call from the pipeline's full teacher grid (img2img: the part its strength keeps)."""
        return grid

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        """The state the pipeline's loop starts from at flow sigma `sigma_start` (the drawn latents, except where
        it mixes in an image, as img2img does). Conditions the pipeline draws from the same generator (an image
        the VAE samples, Flux Inpaint / Fill / Control) are set in `inputs.cond` here, in the pipeline's order."""
        return self.draw(pipe, inputs, generator)

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        """The initial latents `pipe(...)` draws from `generator`, as its own prepare_latents draws them."""
        channels = self.net(pipe).config.in_channels // (4 if self.packed else 1)
        latents = pipe.prepare_latents(inputs.batch, channels, inputs.height, inputs.width, inputs.dtype,
                                       device_of(pipe), generator)
        return latents[0] if isinstance(latents, tuple) else latents
