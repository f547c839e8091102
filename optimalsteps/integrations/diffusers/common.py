"""What every pipeline family shares: the call options, classifier-free guidance (written once), the wrapped
model's base class and small helpers over the pipeline's `__call__` signature."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ...core.errors import OptimalStepsError
from ...core.processes import FLOW, NoiseProcess
from ...core.schedules import Schedule
from ...core.solvers import unipc_times

# the pipelines' classifier-free guidance switches on above this scale
CFG_THRESHOLD = 1.0

Prompts = Union[str, Sequence[str], Sequence[int], dict]


class SettingsWarning(UserWarning):
    """A schedule runs under settings other than those it was searched for, or was changed to fit a scheduler."""


def require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise OptimalStepsError("the diffusers integration needs `pip install optimalsteps[diffusers]`") from None
    return diffusers


def rows(value: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Per-sample conditions for n rows: one row is shared by all (the search keeps B = 1 conditions as is)."""
    if value is not None and value.shape[0] == 1 and n > 1:
        return value.expand((n,) + tuple(value.shape[1:]))
    return value


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def call_default(pipe: Any, name: str) -> Any:
    parameter = call_parameters(pipe).get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def device_of(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.device


def close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def guidance_embedding(scale: Optional[float], n: int, device: torch.device) -> Optional[torch.Tensor]:
    """A distilled model's guidance input for n rows (float32, as the pipelines pass it); None without one."""
    return None if scale is None else torch.full((n,), scale, dtype=torch.float32, device=device)


def flow_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The flow scheduler's timestep of sigma t: sigma * num_train_timesteps in float32."""
    return t.to(torch.float32) * num_train_timesteps


# ------------------------------------------------------------------------------- call options

ATTENTION_NAMES = ("attention_kwargs", "joint_attention_kwargs", "cross_attention_kwargs")
# call options that are pictures or videos: they condition the model but are not recorded with a schedule
MEDIA_OPTIONS = ("image", "last_image", "video", "mask", "reference_images", "mask_image", "control_image")


@dataclass
class CallOptions:
    """The options of a pipeline call that change the model's output, as the user passes them to `pipe(...)`.

    `attention_kwargs` goes to whichever of attention_kwargs / joint_attention_kwargs /
    cross_attention_kwargs the pipeline takes (e.g. {"scale": 0.8} for a LoRA)."""

    guidance_scale: Optional[float] = None
    negative_prompt: Union[str, Sequence[str], None] = None
    images_per_prompt: int = 1
    true_cfg_scale: Optional[float] = None
    num_frames: Optional[int] = None
    max_sequence_length: Optional[int] = None
    attention_kwargs: Optional[dict] = None
    image: Any = None
    guidance_scale_2: Optional[float] = None  # Wan 2.2's second expert
    max_area: Optional[int] = None  # Flux Kontext resizes the call to this many pixels
    use_resolution_binning: Optional[bool] = None  # SANA snaps the call's size to an aspect-ratio bin
    strength: Optional[float] = None  # img2img: how much of the schedule runs from the noised image
    mask_image: Any = None  # inpainting (Flux Fill / Inpaint): white is repainted
    control_image: Any = None  # Flux Control / ControlNet, CogView4 Control
    controlnet_conditioning_scale: Optional[float] = None  # the ControlNet residuals' weight
    last_image: Any = None  # Wan image-to-video: the last frame
    video: Any = None  # Wan VACE: the control video
    mask: Any = None  # Wan VACE: where the control video is regenerated
    reference_images: Any = None  # Wan VACE: pictures the video refers to
    conditioning_scale: Any = None  # Wan VACE: the control blocks' scale (one, or one per block)
    # LTX-2's guidance (x0-space CFG, spatio-temporal and modality-isolation guidance, rescale; audio's own) and the
    # frame rate its positions and audio length follow
    stg_scale: Optional[float] = None
    modality_scale: Optional[float] = None
    guidance_rescale: Optional[float] = None
    audio_guidance_scale: Optional[float] = None
    audio_stg_scale: Optional[float] = None
    audio_modality_scale: Optional[float] = None
    audio_guidance_rescale: Optional[float] = None
    spatio_temporal_guidance_blocks: Optional[list] = None
    frame_rate: Optional[float] = None
    motion_speed: Optional[float] = None
    use_cross_timestep: Optional[bool] = None
    image_crf: Optional[int] = None  # LTX-2 image-to-video: the H.264 re-compression of its image (0: none)

    def given(self) -> dict[str, Any]:
        """The options set to something other than 'the pipeline's default', by their call name."""
        names = [f.name for f in fields(self) if f.name not in ("guidance_scale", "images_per_prompt")]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def attention_parameter(pipe: Any) -> Optional[str]:
    """The name under which the pipeline's __call__ takes attention keyword arguments, if it does."""
    params = call_parameters(pipe)
    return next((name for name in ATTENTION_NAMES if name in params), None)


def check_call_options(pipe: Any, options: CallOptions, extra: Sequence[str] = ()) -> None:
    """Refuse, in one line, an option that this pipeline's __call__ does not take."""
    params = call_parameters(pipe)
    for name in options.given():
        if name == "attention_kwargs":
            if attention_parameter(pipe) is None:
                raise OptimalStepsError(f"{type(pipe).__name__} takes no attention keyword arguments")
        elif name not in params and name not in extra:
            raise OptimalStepsError(f"{type(pipe).__name__} takes no {name}")
    if options.attention_kwargs is not None and not isinstance(options.attention_kwargs, dict):
        raise OptimalStepsError("attention_kwargs must be a dict, e.g. {'scale': 0.8}")


def sequence_length(pipe: Any, options: CallOptions) -> Any:
    """max_sequence_length as the call uses it: the user's, else the __call__ default."""
    value = options.max_sequence_length
    if value is None:
        return call_default(pipe, "max_sequence_length")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptimalStepsError(f"max_sequence_length must be a whole number >= 1, got {value!r}")
    return value


def image_list(image: Any) -> list[Any]:
    """A call's `image` as the list of pictures the multi-image pipelines (Flux 2, QwenImage Edit Plus) take."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def lora_scale(options: CallOptions) -> Optional[float]:
    return (options.attention_kwargs or {}).get("scale")


def given_embeddings(embeds: dict, *names: str) -> dict[str, Any]:
    """encode_prompt's keyword arguments for the user's precomputed `names` and their `negative_` twins
    (None where not given)."""
    return {prefix + name: embeds.get(prefix + name) for name in names for prefix in ("", "negative_")}


def with_negatives(cfg: bool, **pairs: tuple[Any, Any]) -> dict[str, Any]:
    """Per-sample conditions from name=(positive, negative): the positives, then under CFG the `negative_`
    entries."""
    cond = {name: positive for name, (positive, _) in pairs.items()}
    if cfg:
        cond.update({"negative_" + name: negative for name, (_, negative) in pairs.items()})
    return cond


# ------------------------------------------------------------------ classifier-free guidance

def split_conditions(cond: dict[str, torch.Tensor], n: int) -> tuple[dict, Optional[dict]]:
    """(positive, negative) network arguments from per-sample conditions: a `negative_X` entry replaces X in
    the negative branch, the others are shared by both; no negative entries means no negative branch."""
    positive = {k: rows(v, n) for k, v in cond.items() if not k.startswith("negative_")}
    negatives = {k[len("negative_"):]: rows(v, n) for k, v in cond.items() if k.startswith("negative_")}
    return positive, ({**positive, **negatives} if negatives else None)


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as a pipeline does it: `uncond + scale * (cond - uncond)`.

    - `batched`: one network call on the two halves (SD3, SD, DiT) instead of two calls (Flux, Wan, Qwen);
    - `positive_first`: the batched halves' order (DiT puts the labels first, SD the negative);
    - `renorm`: rescale the guided prediction to the conditional one's norm over the last dim (QwenImage).
    """

    scale: float = 1.0
    batched: bool = False
    positive_first: bool = False
    renorm: bool = False

    def __call__(self, net: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, positive: dict,
                 negative: Optional[dict]) -> torch.Tensor:
        if negative is None:
            return net(x, t, positive)
        if self.batched:
            first, second = (positive, negative) if self.positive_first else (negative, positive)
            both = net(torch.cat([x, x]), torch.cat([t, t]), {k: _cat(first[k], second[k]) for k in positive})
            a, b = both.chunk(2)
            cond, uncond = (a, b) if self.positive_first else (b, a)
        else:
            cond, uncond = net(x, t, positive), net(x, t, negative)
        out = uncond + self.scale * (cond - uncond)
        if self.renorm:
            out = out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))
        return out


# ----------------------------------------------------------------------------- the model

class PipelineModel:
    """A pipeline's denoiser in the model contract: `model(x, t, **cond)` is the prediction the pipeline's
    scheduler steps with at time t (flow: velocity d x / d sigma). Families implement `forward`, one network
    call on given rows; guidance, per-sample conditions and the teacher grid are handled here."""

    process: NoiseProcess = FLOW
    prediction: str = "velocity"

    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str,
                 num_train_timesteps: int = 1000, attention: Optional[dict] = None):
        self.net, self.guidance, self.sample_shape, self.spec = net, guidance, tuple(sample_shape), spec
        self.dtype = getattr(net, "dtype", torch.float32)
        self.num_train_timesteps, self.attention = num_train_timesteps, attention
        self._teacher: Optional[Callable[[int], Schedule]] = None
        # UniPC / DPM-Solver with flow sigmas hand the network int64 timesteps (sigma * 1000, truncated)
        self.integer_timesteps = False
        self.scheduler_shift: Optional[float] = None  # the shift those schedulers apply to handed sigmas

    @property
    def time_dtype(self) -> Optional[torch.dtype]:
        """Float64 where the integer timestep is truncated from a float64 sigma: a float32 time can land on
        the other side of an integer (sigma 0.1 is timestep 99 in the scheduler, 100 from float32 0.1)."""
        return torch.float64 if self.integer_timesteps else None

    def flow_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the pipeline's scheduler hands the network at flow sigma t (float64 t where
        `integer_timesteps`)."""
        if not self.integer_timesteps:
            return flow_timestep(t, self.num_train_timesteps)
        # these schedulers take the pre-shifted sigmas `pipeline_kwargs` hands them, shift them back in float64
        # and truncate sigma * 1000: the round trip's last-bit error decides the integer (0.7 -> 699), so it
        # is made here too. UniPC also moves a first sigma of 1 to 1 - 1e-6 (999, not 1000).
        t = t.to(torch.float64)
        k = self.scheduler_shift
        if k is not None:
            pre = t / (t + k * (1.0 - t))
            t = k * pre / (1.0 + (k - 1.0) * pre)
        return torch.trunc(unipc_times(FLOW, t) * self.num_train_timesteps).to(torch.float32)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided network output as the project's prediction (identity for velocity models)."""
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        positive, negative = split_conditions(cond, x.shape[0])
        return self.finish(self.guidance(self.forward, x, t, positive, negative), x, t)

    def set_teacher(self, teacher: Callable[[int], Schedule]) -> None:
        self._teacher = teacher

    def teacher_grid(self, teacher_steps: int) -> Schedule:
        """The pipeline's own teacher grid for this call (its shift / mu at this resolution), which search and
        compare use as the teacher."""
        if self._teacher is None:
            raise OptimalStepsError("this pipeline model was built without its teacher grid")
        return self._teacher(teacher_steps)


@dataclass
class PipelineInputs:
    """A pipeline wrapped for the project: the model, per-sample conditions and the settings to record."""

    model: Any
    cond: dict[str, torch.Tensor]
    batch: int  # prompts x images_per_prompt, in the pipeline's own order
    height: int
    width: int
    num_frames: Optional[int]
    dtype: torch.dtype  # the dtype the pipeline draws its latents in
    metadata: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # what a family needs again to draw latents
