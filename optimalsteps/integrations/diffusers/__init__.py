"""diffusers integration: search a schedule with a pipeline's own network, prompts, guidance and initial
latents, then run it through the pipeline (`pipeline_kwargs`) or with the project's sampler
(`sample_pipeline`).

Each supported pipeline is wrapped into the model contract the way its `__call__` drives the network, so
that the project's Euler on a schedule reproduces the pipeline's Euler scheduler on the same schedule:

- flow matching (Flux, SD3, Wan): process "flow", time = the scheduler's sigma, prediction "velocity" (the
  network output is d x / d sigma = eps - x0, what FlowMatchEulerDiscreteScheduler steps with);
- discrete DDPM models (SD, SDXL, DiT): process "ve" with the scheduler's own largest sigma, state
  x = latent / alpha, network input x / sqrt(sigma^2 + 1) at the fractional timestep of sigma (log-sigma
  interpolation on the scheduler's table), prediction eps (x0 for v- and sample-prediction configs).

An edge module: the core never imports it, and `diffusers` is imported only where a function needs it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ...core.errors import OptimalStepsError
from ...core.processes import FLOW, NoiseProcess, ve_process
from ...core.schedules import Schedule, check_steps, flux_mu, karras
from ...core.schedules import shift as shifted_uniform
from ...core.solvers import get_solver, sample
from ...optimize.options import from_flat
from ...optimize.search import search

# pipeline class -> family; subclasses are recognised through their bases
FAMILIES = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "DiTPipeline": "dit",
    "WanPipeline": "wan",
}
FLOW_FAMILIES = ("flux", "sd3", "wan")
# __call__ sets the scheduler from num_inference_steps alone: no sigmas / timesteps argument
FIXED_SCHEDULE_FAMILIES = ("dit", "wan")
# the pipelines' true classifier-free guidance switches on above this scale
_CFG_THRESHOLD = 1.0

Prompts = Union[str, Sequence[str], Sequence[int], dict]


class SettingsWarning(UserWarning):
    """A schedule runs under settings other than those it was searched for, or was changed to fit a scheduler."""


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise OptimalStepsError("the diffusers integration needs `pip install optimalsteps[diffusers]`") from None
    return diffusers


def pipeline_family(pipe: Any) -> str:
    """The family ("flux", "sd3", "sd", "sdxl", "dit", "wan") of a supported pipeline; refuses any other."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise OptimalStepsError(
        f"{type(pipe).__name__} is not supported; supported pipelines: {', '.join(FAMILIES)}"
    )


# ------------------------------------------------------------------------------- small helpers

def _rows(value: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample conditions for n rows: one row is shared by all (the search keeps B = 1 conditions as is)."""
    if value.shape[0] == 1 and n > 1:
        return value.expand((n,) + tuple(value.shape[1:]))
    return value


def _guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    # the pipelines' own order of operations, so that results agree to rounding
    return uncond + scale * (cond - uncond)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _call_default(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _set_timesteps_params(scheduler: Any) -> set[str]:
    return set(inspect.signature(scheduler.set_timesteps).parameters)


def _device(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.device


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


# ------------------------------------------------------------------ discrete DDPM noise levels

@dataclass(frozen=True)
class SigmaTable:
    """A discrete scheduler's noise levels: the VE sigma of timesteps 0..T-1 and the timestep of any sigma.

    Built from the scheduler's own float32 `alphas_cumprod` (trained betas and zero-SNR rescaling
    included), because the network sees the timesteps diffusers computes from that table.
    """

    log_sigmas: torch.Tensor  # float32 [T], increasing
    continuous: bool  # v-prediction configs with timestep_type="continuous" take 0.25 log sigma

    @classmethod
    def of(cls, scheduler: Any) -> "SigmaTable":
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise OptimalStepsError(f"{type(scheduler).__name__} has no alphas_cumprod: not a discrete DDPM scheduler")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu()
        config = scheduler.config
        continuous = (config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction")
        return cls(torch.log(((1 - ac) / ac) ** 0.5), continuous)

    @property
    def sigma_min(self) -> float:
        return float(torch.exp(self.log_sigmas[0].double()))

    @property
    def process(self) -> NoiseProcess:
        # six significant digits: the process is named ve(sigma_max=%g), and a schedule file re-creates its
        # process from that name, so the start time must survive the round trip exactly
        return ve_process(float(f"{float(torch.exp(self.log_sigmas[-1].double())):g}"))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's float32 timestep at VE sigma: linear interpolation in log sigma, as diffusers does."""
        s = sigma.to(torch.float32)
        if self.continuous:
            return 0.25 * torch.log(s)
        log_s = torch.log(s.clamp(min=1e-10)).double()
        table = self.log_sigmas.double().to(s.device)
        low = (torch.searchsorted(table, log_s, right=True) - 1).clamp(0, len(table) - 2)
        weight = ((table[low] - log_s) / (table[low] - table[low + 1])).clamp(0, 1)
        return (low.double() + weight).to(torch.float32)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """VE sigma (float64) of integer timesteps."""
        return torch.exp(self.log_sigmas.double()[torch.as_tensor(timesteps, dtype=torch.long)])


def _discrete_x0(prediction_type: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network output as the model returns it: eps as is, v- and sample-prediction as x0 (VE state x)."""
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


def _discrete_prediction(prediction_type: str) -> str:
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise OptimalStepsError(f"scheduler prediction_type {prediction_type!r} is not supported")
    return "eps" if prediction_type == "epsilon" else "x0"


# ------------------------------------------------------------------------------- the models

def _flow_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The flow scheduler's timestep of sigma t: sigma * num_train_timesteps in float32."""
    return t.to(torch.float32) * num_train_timesteps


class FluxModel:
    """FluxPipeline's transformer on packed latents [B, seq, 4C]: distilled guidance as an embedding, and
    optionally true CFG (`true_cfg_scale` > 1 with a negative prompt) as two calls, as the pipeline does."""

    process = FLOW
    prediction = "velocity"

    def __init__(self, transformer: Any, guidance: Optional[float], true_cfg_scale: float, img_ids: torch.Tensor,
                 txt_ids: torch.Tensor, negative_txt_ids: Optional[torch.Tensor], dtype: torch.dtype,
                 sample_shape: tuple[int, ...], num_train_timesteps: int, spec: str):
        self.transformer, self.guidance, self.true_cfg_scale = transformer, guidance, true_cfg_scale
        self.img_ids, self.txt_ids, self.negative_txt_ids = img_ids, txt_ids, negative_txt_ids
        self.dtype, self.sample_shape, self.spec = dtype, sample_shape, spec
        self.num_train_timesteps = num_train_timesteps

    def _net(self, h, timestep, guidance, embeds, pooled, txt_ids):
        return self.transformer(hidden_states=h, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=self.img_ids,
                                return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        h = x.to(self.dtype)
        # the pipeline casts the timestep to the latents' dtype, then hands the transformer timestep / 1000
        timestep = _flow_timestep(t, self.num_train_timesteps).to(self.dtype) / 1000
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, dtype=torch.float32, device=x.device)
        out = self._net(h, timestep, guidance, _rows(prompt_embeds, n), _rows(pooled_prompt_embeds, n), self.txt_ids)
        if self.true_cfg_scale > _CFG_THRESHOLD and negative_prompt_embeds is not None:
            negative = self._net(h, timestep, guidance, _rows(negative_prompt_embeds, n),
                                 _rows(negative_pooled_prompt_embeds, n), self.negative_txt_ids)
            out = _guided(negative, out, self.true_cfg_scale)
        return out


class SD3Model:
    """StableDiffusion3Pipeline's transformer; CFG batches [negative, positive] in one call, as the pipeline."""

    process = FLOW
    prediction = "velocity"

    def __init__(self, transformer: Any, guidance_scale: float, dtype: torch.dtype, sample_shape: tuple[int, ...],
                 num_train_timesteps: int, spec: str):
        self.transformer, self.guidance_scale, self.dtype = transformer, guidance_scale, dtype
        self.cfg = guidance_scale > _CFG_THRESHOLD
        self.sample_shape, self.num_train_timesteps, self.spec = sample_shape, num_train_timesteps, spec

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        h = x.to(self.dtype)
        timestep = _flow_timestep(t, self.num_train_timesteps)
        embeds, pooled = _rows(prompt_embeds, n), _rows(pooled_prompt_embeds, n)
        if self.cfg:
            h, timestep = torch.cat([h, h]), torch.cat([timestep, timestep])
            embeds = torch.cat([_rows(negative_prompt_embeds, n), embeds])
            pooled = torch.cat([_rows(negative_pooled_prompt_embeds, n), pooled])
        out = self.transformer(hidden_states=h, timestep=timestep, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = _guided(uncond, cond, self.guidance_scale)
        return out


class WanModel:
    """WanPipeline's transformer(s) on video latents [B, C, F, H, W]: CFG as two calls; Wan 2.2's second
    expert takes the steps below the pipeline's boundary timestep, with its own guidance scale."""

    process = FLOW
    prediction = "velocity"

    def __init__(self, transformer: Any, transformer_2: Any, boundary: Optional[float], guidance_scale: float,
                 guidance_scale_2: float, expand_timesteps: bool, sample_shape: tuple[int, ...],
                 num_train_timesteps: int, spec: str):
        self.transformer, self.transformer_2, self.boundary = transformer, transformer_2, boundary
        self.guidance_scale, self.guidance_scale_2 = guidance_scale, guidance_scale_2
        self.expand_timesteps, self.sample_shape = expand_timesteps, sample_shape
        self.num_train_timesteps, self.spec = num_train_timesteps, spec

    def _expert(self, net: Any, scale: float, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                negative: Optional[torch.Tensor]) -> torch.Tensor:
        h = x.to(net.dtype)
        if self.expand_timesteps:
            # Wan 2.2 TI2V: one timestep per latent token (patches of 2 x 2 pixels per frame)
            tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
            timestep = timestep[:, None].expand(x.shape[0], tokens)
        out = net(hidden_states=h, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        if scale > _CFG_THRESHOLD and negative is not None:
            uncond = net(hidden_states=h, timestep=timestep, encoder_hidden_states=negative, return_dict=False)[0]
            out = _guided(uncond, out, scale)
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        timestep = _flow_timestep(t, self.num_train_timesteps)
        embeds = _rows(prompt_embeds, n)
        negative = _rows(negative_prompt_embeds, n) if negative_prompt_embeds is not None else None
        if self.transformer_2 is None or self.boundary is None:
            return self._expert(self.transformer, self.guidance_scale, x, timestep, embeds, negative)
        # the search mixes times in one batch: route each row to the expert the pipeline uses at its time
        high = timestep >= self.boundary
        out = None
        for mask, net, scale in ((high, self.transformer, self.guidance_scale),
                                 (~high, self.transformer_2, self.guidance_scale_2)):
            if not bool(mask.any()):
                continue
            idx = mask.nonzero().squeeze(1)
            part = self._expert(net, scale, x[idx], timestep[idx], embeds[idx],
                                negative[idx] if negative is not None else None)
            if out is None:
                out = torch.empty(x.shape, dtype=part.dtype, device=part.device)
            out[idx] = part
        return out


class UNetModel:
    """StableDiffusion(XL)Pipeline's UNet on VE states: input x / sqrt(sigma^2 + 1) (the scheduler's
    scale_model_input), CFG batches [negative, positive] in one call; SDXL's pooled text embeddings and
    size conditioning travel as per-sample conditions."""

    def __init__(self, unet: Any, table: SigmaTable, guidance_scale: float, prediction_type: str,
                 dtype: torch.dtype, sample_shape: tuple[int, ...], spec: str):
        self.unet, self.table, self.guidance_scale = unet, table, guidance_scale
        self.cfg = guidance_scale > _CFG_THRESHOLD
        self.prediction_type, self.prediction = prediction_type, _discrete_prediction(prediction_type)
        self.process, self.dtype, self.sample_shape, self.spec = table.process, dtype, sample_shape, spec

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: Optional[torch.Tensor] = None, text_embeds: Optional[torch.Tensor] = None,
                 negative_text_embeds: Optional[torch.Tensor] = None,
                 time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        sigma = _per_sample(t.to(torch.float32), x)
        h = x / (sigma**2 + 1) ** 0.5
        timestep = self.table.timestep(t)
        embeds = _rows(prompt_embeds, n)
        added = None
        if text_embeds is not None:
            added = {"text_embeds": _rows(text_embeds, n), "time_ids": _rows(time_ids, n)}
        if self.cfg:
            h, timestep = torch.cat([h, h]), torch.cat([timestep, timestep])
            embeds = torch.cat([_rows(negative_prompt_embeds, n), embeds])
            if added is not None:
                added = {"text_embeds": torch.cat([_rows(negative_text_embeds, n), added["text_embeds"]]),
                         "time_ids": torch.cat([added["time_ids"], added["time_ids"]])}
        out = self.unet(h.to(self.dtype), timestep, encoder_hidden_states=embeds, added_cond_kwargs=added,
                        return_dict=False)[0]
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = _guided(uncond, cond, self.guidance_scale)
        return _discrete_x0(self.prediction_type, out.to(x.dtype), x, sigma)


class DiTModel:
    """DiTPipeline's class-conditional transformer on VE states. CFG batches [labels, null class] and guides
    only the eps channels; a learned-sigma output's variance channels are dropped, as the pipeline does."""

    def __init__(self, transformer: Any, table: SigmaTable, guidance_scale: float, null_class: int,
                 prediction_type: str, sample_shape: tuple[int, ...], spec: str):
        self.transformer, self.table, self.guidance_scale = transformer, table, guidance_scale
        self.cfg = guidance_scale > _CFG_THRESHOLD
        self.null_class, self.channels = null_class, transformer.config.in_channels
        self.prediction_type, self.prediction = prediction_type, _discrete_prediction(prediction_type)
        self.process, self.sample_shape, self.spec = table.process, sample_shape, spec

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sigma = _per_sample(t.to(torch.float32), x)
        h = x / (sigma**2 + 1) ** 0.5
        timestep = self.table.timestep(t)
        labels = _rows(class_labels, n)
        if self.cfg:
            h, timestep = torch.cat([h, h]), torch.cat([timestep, timestep])
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        out = self.transformer(h.to(self.transformer.dtype), timestep=timestep, class_labels=labels).sample
        eps = out[:, : self.channels]
        if self.cfg:
            cond, uncond = eps.chunk(2)
            eps = _guided(uncond, cond, self.guidance_scale)
        return _discrete_x0(self.prediction_type, eps.to(x.dtype), x, sigma)


# -------------------------------------------------------------------- settings and validation

def _vae_scale_factor(pipe: Any, family: str) -> int:
    if family == "wan":
        return int(getattr(pipe, "vae_scale_factor_spatial", 8))
    if family == "dit":
        vae = getattr(pipe, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return int(pipe.vae_scale_factor)


def _default_resolution(pipe: Any, family: str) -> tuple[int, int]:
    vsf = _vae_scale_factor(pipe, family)
    if family == "sd":
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * vsf, w * vsf
    if family == "dit":
        size = pipe.transformer.config.sample_size
        return size * vsf, size * vsf
    if family == "wan":
        return int(_call_default(pipe, "height")), int(_call_default(pipe, "width"))
    return pipe.default_sample_size * vsf, pipe.default_sample_size * vsf


def _size_rules(family: str, vae_scale_factor: int, net_config: Any) -> dict[str, Optional[int]]:
    """What sizes a pipeline takes: a multiple of pixels, SD3's position-embedding limit, DiT's one size."""
    if family == "dit":
        return {"fixed": net_config["sample_size"] * vae_scale_factor}
    if family == "sd3":
        pixels = vae_scale_factor * net_config["patch_size"]
        return {"multiple": pixels, "patch_pixels": pixels, "limit": net_config.get("pos_embed_max_size")}
    if family == "flux":
        return {"multiple": vae_scale_factor * 2}  # latents are packed in 2 x 2 patches
    return {"multiple": 16 if family == "wan" else 8}  # what the pipelines' check_inputs demand


def _check_size(cls: str, rules: dict[str, Optional[int]], h: Any, w: Any) -> tuple[int, int]:
    for name, value in (("height", h), ("width", w)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptimalStepsError(f"{name} must be a whole number of pixels >= 1, got {value!r}")
    h, w = int(h), int(w)
    fixed = rules.get("fixed")
    if fixed is not None:
        if (h, w) != (fixed, fixed):
            raise OptimalStepsError(f"{cls} generates {fixed}x{fixed} only, got {h}x{w}")
        return h, w
    multiple = rules["multiple"]
    if h % multiple or w % multiple:
        raise OptimalStepsError(f"{cls} needs height and width divisible by {multiple}, got {h}x{w}")
    limit = rules.get("limit")
    if limit is not None and max(h, w) // rules["patch_pixels"] > limit:
        raise OptimalStepsError(f"{h}x{w} is {max(h, w) // rules['patch_pixels']} patches across; the SD3 "
                                f"transformer takes at most {limit}")
    return h, w


def _resolution(pipe: Any, family: str, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """The pixel resolution a call runs at, checked against what the pipeline and its network can take."""
    default_h, default_w = _default_resolution(pipe, family)
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    rules = _size_rules(family, _vae_scale_factor(pipe, family), net.config)
    return _check_size(type(pipe).__name__, rules, default_h if height is None else height,
                       default_w if width is None else width)


def _num_frames(pipe: Any, family: str, num_frames: Optional[int]) -> Optional[int]:
    if family != "wan":
        if num_frames is not None:
            raise OptimalStepsError(f"num_frames is only for video pipelines, not {type(pipe).__name__}")
        return None
    frames = int(_call_default(pipe, "num_frames")) if num_frames is None else num_frames
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1 or (frames - 1) % temporal:
        raise OptimalStepsError(f"num_frames must be 1 more than a multiple of {temporal}, got {frames!r}")
    return int(frames)


def _image_seq_len(pipe: Any, family: str, height: int, width: int) -> int:
    vsf = _vae_scale_factor(pipe, family)
    if family == "flux":
        return (height // (vsf * 2)) * (width // (vsf * 2))
    patch = pipe.transformer.config.patch_size
    return (height // vsf // patch) * (width // vsf // patch)


def flow_shift(pipe: Any, height: Optional[int] = None, width: Optional[int] = None) -> tuple[float, dict]:
    """(k, settings) of a flow pipeline's time shift at a resolution: the scheduler maps sigma to
    k sigma / (1 + (k - 1) sigma), with k the static shift, e^mu (Flux's dynamic shift) or mu ("linear")."""
    family = pipeline_family(pipe)
    if family not in FLOW_FAMILIES:
        raise OptimalStepsError(f"{type(pipe).__name__} is not a flow-matching pipeline")
    height, width = _resolution(pipe, family, height, width)
    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting"):
        if family == "wan":
            raise OptimalStepsError("WanPipeline passes no mu: its scheduler cannot use use_dynamic_shifting")
        mu = flux_mu(_image_seq_len(pipe, family, height, width), config.get("base_image_seq_len", 256),
                     config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                     config.get("max_shift", 1.15))
        exponential = config.get("time_shift_type", "exponential") == "exponential"
        return (math.exp(mu) if exponential else mu), {"mu": mu, "dynamic_shift": True}
    k = config.get("flow_shift", 1.0) if config.get("use_flow_sigmas") else config.get("shift", 1.0)
    return float(k), {"shift": float(k), "dynamic_shift": False}


def _guidance(pipe: Any, family: str, guidance_scale: Optional[float]) -> tuple[float, str]:
    """(scale, kind): kind is "cfg" (true classifier-free guidance), "distilled" (Flux's embedding) or "none"."""
    scale = _call_default(pipe, "guidance_scale") if guidance_scale is None else guidance_scale
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise OptimalStepsError(f"guidance scale must be a number, got {guidance_scale!r}") from None
    if not math.isfinite(scale):
        raise OptimalStepsError(f"guidance scale must be finite, got {scale}")
    if family == "flux":
        return scale, "distilled" if pipe.transformer.config.guidance_embeds else "none"
    if family in ("sd", "sdxl") and pipe.unet.config.time_cond_proj_dim is not None:
        raise OptimalStepsError("UNets with a guidance embedding (time_cond_proj_dim, LCM) are not supported")
    return scale, "cfg" if scale > _CFG_THRESHOLD else "none"


def _model_id(pipe: Any) -> Optional[str]:
    return getattr(pipe, "name_or_path", None) or None


# ----------------------------------------------------------------------------- prompts

@dataclass
class _Conditioning:
    texts: Optional[list[str]]
    embeds: dict[str, torch.Tensor]
    labels: Optional[list[int]]
    count: int  # prompts (or labels) before images_per_prompt repeats them


_POOLED_FAMILIES = ("flux", "sd3", "sdxl")


def _conditioning(pipe: Any, family: str, prompts: Prompts, negative_prompt: Any) -> _Conditioning:
    """Check prompts (texts, DiT class labels or ids, or a dict of the pipeline's *_embeds arguments)."""
    if family == "dit":
        return _labels(pipe, prompts, negative_prompt)
    if isinstance(prompts, dict):
        return _embeddings(pipe, family, prompts, negative_prompt)
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(p, str) for p in texts):
        raise OptimalStepsError("prompts must be a string, a non-empty list of strings, or a dict of embeddings")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise OptimalStepsError(f"this {type(pipe).__name__} has no text encoder: pass prompt embeddings "
                                "(a dict with prompt_embeds, ...) instead of texts")
    _check_negative(negative_prompt, len(texts))
    return _Conditioning(list(texts), {}, None, len(texts))


def _check_negative(negative_prompt: Any, count: int) -> None:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise OptimalStepsError("negative_prompt must be a string or a list of strings")
    if len(negative_prompt) != count:
        raise OptimalStepsError(f"{len(negative_prompt)} negative prompts for {count} prompts")


def _embeddings(pipe: Any, family: str, embeds: dict, negative_prompt: Any) -> _Conditioning:
    allowed = {name for name in inspect.signature(type(pipe).__call__).parameters
               if name.endswith("_embeds") and not name.startswith(("ip_adapter", "negative_ip_adapter"))}
    unknown = sorted(set(embeds) - allowed)
    if unknown:
        raise OptimalStepsError(f"unknown embedding(s) {unknown} for {type(pipe).__name__}; known: {sorted(allowed)}")
    required = ["prompt_embeds"] + (["pooled_prompt_embeds"] if family in _POOLED_FAMILIES else [])
    missing = [name for name in required if embeds.get(name) is None]
    if missing:
        raise OptimalStepsError(f"{type(pipe).__name__} needs {', '.join(missing)} with prompt embeddings")
    if negative_prompt is not None:
        raise OptimalStepsError("give negative_prompt_embeds, not negative_prompt, together with prompt embeddings")
    given = {k: v for k, v in embeds.items() if v is not None}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or not value.is_floating_point():
            raise OptimalStepsError(f"{name} must be a floating-point tensor [B, ...]")
    count = given["prompt_embeds"].shape[0]
    for name, value in given.items():
        if value.shape[0] != count:
            raise OptimalStepsError(f"{name} has {value.shape[0]} rows but prompt_embeds has {count}")
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        negative = given.get(f"negative_{name}")
        if negative is not None and name in given and negative.shape != given[name].shape:
            raise OptimalStepsError(f"negative_{name} has shape {list(negative.shape)} but {name} has "
                                    f"{list(given[name].shape)}")
    if ("negative_prompt_embeds" in given) != ("negative_pooled_prompt_embeds" in given) and family in _POOLED_FAMILIES:
        raise OptimalStepsError("give both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
    return _Conditioning(None, given, None, count)


def _labels(pipe: Any, prompts: Any, negative_prompt: Any) -> _Conditioning:
    if negative_prompt is not None:
        raise OptimalStepsError("DiTPipeline has no negative prompt (its unconditional branch is the null class)")
    items = [prompts] if isinstance(prompts, (str, int, np.integer)) else prompts
    if not isinstance(items, (list, tuple)) or not items:
        raise OptimalStepsError("DiTPipeline prompts must be class ids or ImageNet label names")
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    labels = []
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, str):
            known = getattr(pipe, "labels", {}) or {}
            if item not in known:
                raise OptimalStepsError(f"unknown class label {item!r} for this DiTPipeline")
            item = known[item]
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not 0 <= item < num_classes:
            raise OptimalStepsError(f"class id {item!r} is out of range for a DiT with {num_classes} classes")
        labels.append(int(item))
    return _Conditioning(None, {}, labels, len(labels))


# ------------------------------------------------------------------------- encoding, inputs

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


def pipeline_inputs(pipe: Any, prompts: Prompts, guidance_scale: Optional[float] = None,
                    height: Optional[int] = None, width: Optional[int] = None, *,
                    negative_prompt: Union[str, Sequence[str], None] = None, images_per_prompt: int = 1,
                    true_cfg_scale: Optional[float] = None, num_frames: Optional[int] = None) -> PipelineInputs:
    """Check the request against the pipeline, encode the prompts and wrap the network into the model
    contract. Every check runs before the text encoders do."""
    _require_diffusers()
    family = pipeline_family(pipe)
    height, width = _resolution(pipe, family, height, width)
    frames = _num_frames(pipe, family, num_frames)
    scale, kind = _guidance(pipe, family, guidance_scale)
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, (int, np.integer)) \
            or images_per_prompt < 1:
        raise OptimalStepsError(f"images_per_prompt must be a whole number >= 1, got {images_per_prompt!r}")
    true_cfg = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
    if true_cfg != 1.0 and family != "flux":
        raise OptimalStepsError("true_cfg_scale is FluxPipeline's; other pipelines use guidance_scale")
    conditioning = _conditioning(pipe, family, prompts, negative_prompt)
    shift_info = flow_shift(pipe, height, width)[1] if family in FLOW_FAMILIES else {}
    spec = f"diffusers:{_model_id(pipe) or type(pipe).__name__}"
    build = {"flux": _flux_inputs, "sd3": _sd3_inputs, "wan": _wan_inputs, "sd": _unet_inputs,
             "sdxl": _unet_inputs, "dit": _dit_inputs}[family]
    with torch.no_grad():
        model, cond, dtype = build(pipe, family, conditioning, scale, height, width, frames, int(images_per_prompt),
                                   negative_prompt, true_cfg, spec)
    batch = conditioning.count * int(images_per_prompt)
    metadata = {
        "pipeline": type(pipe).__name__, "model_id": _model_id(pipe), "scheduler": type(pipe.scheduler).__name__,
        "height": height, "width": width, "guidance_scale": scale, "guidance": kind, **shift_info,
        "prediction": pipe.scheduler.config.get("prediction_type", "flow"),
        "prompts": conditioning.texts if conditioning.texts is not None else (
            conditioning.labels if conditioning.labels is not None else "embeddings"),
        "images_per_prompt": int(images_per_prompt),
    }
    if frames is not None:
        metadata["num_frames"] = frames
    if negative_prompt is not None:
        metadata["negative_prompt"] = negative_prompt
    if family == "flux" and true_cfg != 1.0:
        metadata["true_cfg_scale"] = true_cfg
    return PipelineInputs(model, cond, batch, height, width, frames, dtype, metadata)


def _negatives(negative_prompt: Any, count: int) -> Any:
    # one negative prompt for every prompt, as the SD pipelines broadcast it themselves
    return [negative_prompt] * count if isinstance(negative_prompt, str) else negative_prompt


def _flux_inputs(pipe, family, c: _Conditioning, scale, height, width, frames, n, negative_prompt, true_cfg, spec):
    device = _device(pipe)
    length = _call_default(pipe, "max_sequence_length")
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=c.texts, prompt_2=None, prompt_embeds=c.embeds.get("prompt_embeds"),
        pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"), device=device, num_images_per_prompt=n,
        max_sequence_length=length)
    cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    negative_ids = None
    has_negative = negative_prompt is not None or "negative_prompt_embeds" in c.embeds
    if true_cfg > _CFG_THRESHOLD and has_negative:
        neg, neg_pooled, negative_ids = pipe.encode_prompt(
            prompt=_negatives(negative_prompt, c.count), prompt_2=None,
            prompt_embeds=c.embeds.get("negative_prompt_embeds"),
            pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"), device=device,
            num_images_per_prompt=n, max_sequence_length=length)
        cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    vsf = pipe.vae_scale_factor
    h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, embeds.dtype)
    guidance = scale if pipe.transformer.config.guidance_embeds else None
    shape = ((h // 2) * (w // 2), pipe.transformer.config.in_channels)
    model = FluxModel(pipe.transformer, guidance, true_cfg, img_ids, text_ids, negative_ids, embeds.dtype, shape,
                      pipe.scheduler.config.num_train_timesteps, spec)
    return model, cond, embeds.dtype


def _sd3_inputs(pipe, family, c: _Conditioning, scale, height, width, frames, n, negative_prompt, true_cfg, spec):
    cfg = scale > _CFG_THRESHOLD
    _check_unconditional(pipe, c, cfg)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=c.texts, prompt_2=None, prompt_3=None, device=_device(pipe), num_images_per_prompt=n,
        do_classifier_free_guidance=cfg, negative_prompt=_negatives(negative_prompt, c.count),
        prompt_embeds=c.embeds.get("prompt_embeds"), negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
        pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"),
        negative_pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"),
        max_sequence_length=_call_default(pipe, "max_sequence_length"))
    cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if cfg:
        cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    vsf = pipe.vae_scale_factor
    shape = (pipe.transformer.config.in_channels, height // vsf, width // vsf)
    model = SD3Model(pipe.transformer, scale, embeds.dtype, shape, pipe.scheduler.config.num_train_timesteps, spec)
    return model, cond, embeds.dtype


def _wan_inputs(pipe, family, c: _Conditioning, scale, height, width, frames, n, negative_prompt, true_cfg, spec):
    cfg = scale > _CFG_THRESHOLD
    _check_unconditional(pipe, c, cfg)
    embeds, neg = pipe.encode_prompt(
        prompt=c.texts, negative_prompt=_negatives(negative_prompt, c.count), do_classifier_free_guidance=cfg,
        num_videos_per_prompt=n, prompt_embeds=c.embeds.get("prompt_embeds"),
        negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
        max_sequence_length=_call_default(pipe, "max_sequence_length"), device=_device(pipe))
    net = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    cond = {"prompt_embeds": embeds.to(net.dtype)}
    if cfg:
        cond["negative_prompt_embeds"] = neg.to(net.dtype)
    config = pipe.scheduler.config
    ratio = pipe.config.get("boundary_ratio")
    boundary = ratio * config.num_train_timesteps if ratio is not None else None
    vsf, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    shape = (net.config.in_channels, (frames - 1) // temporal + 1, height // vsf, width // vsf)
    model = WanModel(pipe.transformer, getattr(pipe, "transformer_2", None), boundary, scale, scale,
                     bool(pipe.config.get("expand_timesteps", False)), shape, config.num_train_timesteps, spec)
    return model, cond, torch.float32


def _unet_inputs(pipe, family, c: _Conditioning, scale, height, width, frames, n, negative_prompt, true_cfg, spec):
    cfg = scale > _CFG_THRESHOLD
    _check_unconditional(pipe, c, cfg)
    negatives = _negatives(negative_prompt, c.count)
    device = _device(pipe)
    if family == "sd":
        embeds, neg = pipe.encode_prompt(c.texts, device, n, cfg, negatives,
                                         prompt_embeds=c.embeds.get("prompt_embeds"),
                                         negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"))
        cond = {"prompt_embeds": embeds}
    else:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=c.texts, prompt_2=None, device=device, num_images_per_prompt=n, do_classifier_free_guidance=cfg,
            negative_prompt=negatives, negative_prompt_2=None, prompt_embeds=c.embeds.get("prompt_embeds"),
            negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
            pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"))
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        try:
            time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                              text_encoder_projection_dim=projection)
        except ValueError as exc:
            raise OptimalStepsError(f"SDXL size conditioning does not fit this UNet: {exc}") from None
        cond = {"prompt_embeds": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(device).repeat(embeds.shape[0], 1)}
        if cfg:
            cond["negative_text_embeds"] = neg_pooled
    if cfg:
        cond["negative_prompt_embeds"] = neg
    vsf = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, height // vsf, width // vsf)
    table = SigmaTable.of(pipe.scheduler)
    model = UNetModel(pipe.unet, table, scale, pipe.scheduler.config.get("prediction_type", "epsilon"),
                      pipe.unet.dtype, shape, spec)
    return model, cond, embeds.dtype


def _dit_inputs(pipe, family, c: _Conditioning, scale, height, width, frames, n, negative_prompt, true_cfg, spec):
    labels = [label for label in c.labels for _ in range(n)]
    config = pipe.transformer.config
    cond = {"class_labels": torch.tensor(labels, dtype=torch.long, device=_device(pipe))}
    shape = (config.in_channels, config.sample_size, config.sample_size)
    table = SigmaTable.of(pipe.scheduler)
    # the pipeline hard-codes ImageNet's null class 1000, which is the embedding table's extra row
    model = DiTModel(pipe.transformer, table, scale, int(config.num_embeds_ada_norm),
                     pipe.scheduler.config.get("prediction_type", "epsilon"), shape, spec)
    return model, cond, pipe.transformer.dtype


def _check_unconditional(pipe: Any, c: _Conditioning, cfg: bool) -> None:
    no_encoder = getattr(pipe, "text_encoder", None) is None
    if cfg and c.texts is None and "negative_prompt_embeds" not in c.embeds and no_encoder:
        raise OptimalStepsError("guidance needs negative_prompt_embeds: this pipeline has no text encoder "
                                "to encode the empty prompt")


# ---------------------------------------------------------------------------- initial latents

def draw_latents(pipe: Any, inputs: PipelineInputs, generator: Any = None) -> torch.Tensor:
    """The pipeline's initial latents (unit variance) for `generator`, drawn exactly as its __call__ does."""
    from diffusers.utils.torch_utils import randn_tensor

    family = pipeline_family(pipe)
    device, batch, h, w = _device(pipe), inputs.batch, inputs.height, inputs.width
    if family == "flux":
        latents, _ = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, h, w, inputs.dtype,
                                          device, generator)
    elif family == "sd3":
        latents = pipe.prepare_latents(batch, pipe.transformer.config.in_channels, h, w, inputs.dtype, device,
                                       generator)
    elif family == "wan":
        latents = pipe.prepare_latents(batch, inputs.model.sample_shape[0], h, w, inputs.num_frames, inputs.dtype,
                                       device, generator)
    else:
        # SD scales by the scheduler's init_noise_sigma afterwards (see _initial_ve_scale); DiT never does
        latents = randn_tensor((batch,) + tuple(inputs.model.sample_shape), generator=generator, device=device,
                               dtype=inputs.dtype)
    return latents


def _initial_ve_scale(pipe: Any, family: str, sigma0: float) -> float:
    """The VE state a pipeline starts from, per unit of its drawn latents, for a schedule starting at sigma0.

    Schedulers that integrate VE states (Euler, ...) start from latents * init_noise_sigma: sigma0 for
    "linspace"/"trailing" spacing, sqrt(sigma0^2 + 1) for "leading". The others (DDIM, DPM-Solver, ...) start
    from the latents themselves as the VP state, which is the VE state latents * sqrt(sigma0^2 + 1); DiT's
    pipeline always does so.
    """
    vp = math.sqrt(sigma0 * sigma0 + 1.0)
    if family == "dit":
        return vp
    scheduler = copy.deepcopy(pipe.scheduler)
    if "sigmas" in _set_timesteps_params(scheduler):
        scheduler.set_timesteps(sigmas=[sigma0, 0.0])
    init = float(scheduler.init_noise_sigma)
    return init if init > 1.0 else vp


def sampler_noise(pipe: Any, latents: torch.Tensor, process: NoiseProcess, t_start: float) -> torch.Tensor:
    """Noise n with sigma(t_start) * n equal to the state the pipeline starts from with these latents."""
    family = pipeline_family(pipe)
    sigma0 = float(process.sigma(torch.tensor(t_start, dtype=torch.float64)))
    latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
    if family in FLOW_FAMILIES:
        return latents / sigma0  # a flow pipeline starts from the latents whatever its first sigma
    return latents * (_initial_ve_scale(pipe, family, float(process.sigma_ve(t_start))) / sigma0)


# ------------------------------------------------------------------------------ schedules

def _in_process(schedule: Schedule, process: NoiseProcess) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise OptimalStepsError(f"expected a Schedule, got {type(schedule).__name__}")
    if schedule.process.name == process.name:
        return schedule
    warnings.warn(f"the schedule is for process {schedule.process.name}, the pipeline's is {process.name}: "
                  "converted by matching log-SNR", SettingsWarning, stacklevel=3)
    return schedule.in_process(process)


def pipeline_process(pipe: Any) -> NoiseProcess:
    """The process a pipeline's model runs in: flow, or VE with the scheduler's largest sigma."""
    family = pipeline_family(pipe)
    return FLOW if family in FLOW_FAMILIES else SigmaTable.of(pipe.scheduler).process


def pipeline_teacher(pipe: Any, teacher_steps: int, height: Optional[int] = None,
                     width: Optional[int] = None) -> Schedule:
    """The default teacher grid for a pipeline: its own shifted uniform flow schedule (shift or mu at this
    resolution), or Karras rho = 7 over the discrete model's trained sigma range, then 0."""
    family = pipeline_family(pipe)
    teacher_steps = check_steps(teacher_steps)
    if family in FLOW_FAMILIES:
        k, info = flow_shift(pipe, height, width)
        teacher = shifted_uniform(FLOW, teacher_steps, shift=k)
        teacher.metadata.update(info)
        return teacher
    table = SigmaTable.of(pipe.scheduler)
    return karras(table.process, teacher_steps, sigma_min=table.sigma_min)


def scheduler_solver(scheduler: Any) -> Optional[str]:
    """The project solver a diffusers scheduler's update is (None where it is none of them)."""
    name, config = type(scheduler).__name__, scheduler.config
    if name in ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler") and not config.get("stochastic_sampling"):
        return "euler"
    if name == "DDIMScheduler":
        return "euler"  # DDIM with eta = 0 is the first-order exponential integrator, the project's euler
    if name == "HeunDiscreteScheduler":
        return "heun"
    if (name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "dpmsolver++"
            and config.get("solver_order") == 2):
        return "dpmpp2m"
    return None


def pipeline_schedule(pipe: Any, num_inference_steps: int, height: Optional[int] = None,
                      width: Optional[int] = None) -> Schedule:
    """The schedule `pipe(..., num_inference_steps=M)` runs by default, as a Schedule (the baseline to beat,
    and how runs of pipelines without custom schedules, DiT and Wan, are reproduced by `sample_pipeline`)."""
    family = pipeline_family(pipe)
    steps = check_steps(num_inference_steps)
    process = pipeline_process(pipe)
    scheduler = copy.deepcopy(pipe.scheduler)
    name = type(scheduler).__name__
    try:
        if family == "flux":
            mu = flow_shift(pipe, height, width)[1].get("mu")
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        elif family == "sd3" and scheduler.config.get("use_dynamic_shifting"):
            scheduler.set_timesteps(steps, mu=flow_shift(pipe, height, width)[1]["mu"])
        else:
            scheduler.set_timesteps(steps)
    except ValueError as exc:
        raise OptimalStepsError(f"{name} could not set {steps} steps: {exc}") from None
    if family in FLOW_FAMILIES:
        times = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
    elif name == "DDIMScheduler":
        times = _ddim_sigmas(scheduler, steps)
    elif getattr(scheduler, "sigmas", None) is not None and len(scheduler.sigmas) == len(scheduler.timesteps) + 1:
        times = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
    else:
        raise OptimalStepsError(f"cannot read the schedule of {name}")
    if len(times) != steps + 1 or float(times[-1]) != 0.0:
        raise OptimalStepsError(f"{name} does not run {steps} steps ending at sigma 0 (got {len(times)} sigmas "
                                f"ending at {float(times[-1]):.4g}); it is not an ODE schedule this library runs")
    times = times.clamp(max=process.t_start)  # sigma_max is kept to 6 digits in the process name
    return Schedule(times, process, solver=scheduler_solver(scheduler),
                    metadata={"baseline": "pipeline", "pipeline": type(pipe).__name__, "scheduler": name})


def _ddim_sigmas(scheduler: Any, steps: int) -> torch.Tensor:
    """DDIM steps from each timestep to timestep - T // M (the clean end past 0 with set_alpha_to_one): a
    schedule only where each target is the next timestep, as with "leading" spacing."""
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = scheduler.config.num_train_timesteps // steps
    targets = [t - stride for t in timesteps]
    if targets[:-1] != timesteps[1:] or targets[-1] >= 0 or not scheduler.config.get("set_alpha_to_one", True):
        raise OptimalStepsError("this DDIMScheduler's steps do not chain into one schedule ending at sigma 0 "
                                "(use timestep_spacing='leading' and set_alpha_to_one=True)")
    sigmas = SigmaTable.of(scheduler).sigma(torch.tensor(timesteps))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ------------------------------------------------------------------------- settings checks

def _current_settings(pipe: Any, family: str, height: int, width: int, guidance_scale: Optional[float],
                      num_frames: Optional[int] = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"pipeline": type(pipe).__name__, "model_id": _model_id(pipe),
                                "height": height, "width": width}
    if family in FLOW_FAMILIES:
        settings.update(flow_shift(pipe, height, width)[1])
    if guidance_scale is not None:
        settings["guidance_scale"] = float(guidance_scale)
    if num_frames is not None:
        settings["num_frames"] = num_frames
    return settings


def _warn_settings(schedule: Schedule, current: dict[str, Any], solver: Optional[str], runner: str) -> None:
    """One warning listing every setting that differs from those the schedule was searched under."""
    recorded = schedule.metadata.get("diffusers") or {}
    diffs = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in current.items()
             if key in recorded and recorded[key] is not None and value is not None
             and not _close(recorded[key], value)]
    if diffs:
        warnings.warn("the schedule was searched under other settings (" + "; ".join(diffs) +
                      "): it may not be optimal for these", SettingsWarning, stacklevel=3)
    if schedule.solver and solver != schedule.solver:
        warnings.warn(f"the schedule was searched for {schedule.solver} but {runner} runs "
                      f"{solver or 'its own solver'}; sample_pipeline(..., solver={schedule.solver!r}) runs it as "
                      "searched", SettingsWarning, stacklevel=3)


def pipeline_kwargs(schedule: Schedule, pipe: Any, height: Optional[int] = None, width: Optional[int] = None,
                    guidance_scale: Optional[float] = None) -> dict[str, Any]:
    """Keyword arguments that make `pipe(...)` run exactly `schedule`.

    - FlowMatchEulerDiscreteScheduler (Flux, SD3): `sigmas` without the terminal 0 (the scheduler appends
      it), pre-divided by the scheduler's static or dynamic shift so that shifting them gives the schedule
      back (plus `mu` for SD3, which takes it). For Flux's dynamic shift, pass the height / width you call the
      pipeline with (default: the schedule's own), since mu follows the resolution.
    - EulerDiscreteScheduler (SD, SDXL): `sigmas` with the terminal 0, M + 1 values.
    - schedulers that take only integer `timesteps` (DPMSolverMultistep, Heun, ...): rounded timesteps, with
      a SettingsWarning saying how far rounding moved the sigmas.
    Refuses schedulers and pipelines that cannot take a custom schedule (DDIM, DiT, Wan: use
    `sample_pipeline`), and warns when the pipeline, resolution, shift / mu, guidance or solver differ from
    those recorded at search time.
    """
    family = pipeline_family(pipe)
    cls = type(pipe).__name__
    if family in FIXED_SCHEDULE_FAMILIES:
        raise OptimalStepsError(f"{cls} takes no custom schedule (its __call__ has no sigmas or timesteps); run "
                                "the schedule with optimalsteps.diffusers.sample_pipeline")
    recorded = schedule.metadata.get("diffusers") or {}
    height = recorded.get("height") if height is None else height
    width = recorded.get("width") if width is None else width
    height, width = _resolution(pipe, family, height, width)
    schedule = _in_process(schedule, pipeline_process(pipe))
    current = _current_settings(pipe, family, height, width, guidance_scale)
    _warn_settings(schedule, current, scheduler_solver(pipe.scheduler), type(pipe.scheduler).__name__)
    if family in FLOW_FAMILIES:
        return _flow_kwargs(schedule, pipe, family, height, width)
    return _discrete_kwargs(schedule, pipe)


def _flow_kwargs(schedule: Schedule, pipe: Any, family: str, height: int, width: int) -> dict[str, Any]:
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    if name != "FlowMatchEulerDiscreteScheduler":
        raise OptimalStepsError(f"{name} cannot take a custom flow schedule exactly; set pipe.scheduler = "
                                "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), or run "
                                "sample_pipeline")
    config = scheduler.config
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                 "stochastic_sampling", "shift_terminal"):
        if config.get(flag):
            raise OptimalStepsError(f"FlowMatchEulerDiscreteScheduler with {flag}={config.get(flag)!r} changes "
                                    "custom sigmas; build the scheduler without it")
    k, info = flow_shift(pipe, height, width)
    sigmas = schedule.to_flow_sigmas()
    # the scheduler maps s to k s / (1 + (k - 1) s); hand it the preimage of each schedule sigma, written
    # so that sigma = 1 stays exactly 1 for any k
    unshifted = sigmas / (sigmas + k * (1.0 - sigmas))
    kwargs: dict[str, Any] = {"sigmas": unshifted.tolist()}
    if family == "sd3" and info.get("dynamic_shift"):
        kwargs["mu"] = info["mu"]  # SD3 takes mu, which pins it against the call's resolution
    return kwargs


def _discrete_kwargs(schedule: Schedule, pipe: Any) -> dict[str, Any]:
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    params = _set_timesteps_params(scheduler)
    if name == "EulerDiscreteScheduler":
        return {"sigmas": schedule.to_sigmas().tolist()}  # M + 1 values: it expects the terminal 0
    if "timesteps" in params and getattr(scheduler, "alphas_cumprod", None) is not None:
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            if scheduler.config.get(flag):
                raise OptimalStepsError(f"{name} with {flag}=True cannot take custom timesteps")
        return {"timesteps": _rounded_timesteps(schedule, scheduler)}
    raise OptimalStepsError(f"{name} takes no custom schedule (its set_timesteps has neither sigmas nor "
                            "timesteps); set pipe.scheduler = EulerDiscreteScheduler.from_config("
                            "pipe.scheduler.config), or run sample_pipeline")


def _rounded_timesteps(schedule: Schedule, scheduler: Any) -> list[int]:
    table = SigmaTable.of(scheduler)
    sigmas = schedule.to_sigmas()[:-1]
    rounded = torch.round(table.timestep(sigmas).double()).long().clamp(0, len(table.log_sigmas) - 1)
    if bool((rounded[1:] >= rounded[:-1]).any()):
        raise OptimalStepsError(f"rounding to integer timesteps merges steps ({rounded.tolist()}); use "
                                "EulerDiscreteScheduler (it takes sigmas) or sample_pipeline")
    change = float(((table.sigma(rounded) / sigmas) - 1.0).abs().max())
    warnings.warn(f"{type(scheduler).__name__} takes integer timesteps only: rounding moved the schedule's sigmas "
                  f"by up to {100 * change:.3g}% (timesteps {rounded.tolist()})", SettingsWarning, stacklevel=4)
    return rounded.tolist()


# ---------------------------------------------------------------------------- search and sample

def search_pipeline(pipe: Any, prompts: Prompts, steps: int, teacher_steps: int = 200,
                    guidance_scale: Optional[float] = None, height: Optional[int] = None,
                    width: Optional[int] = None, seed: int = 0, *, images_per_prompt: int = 1,
                    negative_prompt: Union[str, Sequence[str], None] = None, true_cfg_scale: Optional[float] = None,
                    num_frames: Optional[int] = None, teacher_schedule: Optional[Schedule] = None,
                    **search_options: Any) -> Any:
    """Search an M-step schedule with a pipeline's own network, prompts and guidance, on the initial latents
    `pipe(prompts, generator=torch.Generator().manual_seed(seed))` would draw, over all prompts at once
    (`aggregate="joint"`, or "median" of per-sample schedules). The teacher defaults to `pipeline_teacher`.
    Other options go to `optimalsteps.search.search`. Returns its SearchResult, whose schedules record the
    pipeline settings under metadata["diffusers"]."""
    steps = check_steps(steps)
    if teacher_schedule is None and steps >= check_steps(teacher_steps):
        raise OptimalStepsError(f"steps ({steps}) must be fewer than the teacher's steps ({teacher_steps})")
    inputs = pipeline_inputs(pipe, prompts, guidance_scale, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                             num_frames=num_frames)
    if teacher_schedule is None:
        teacher_schedule = pipeline_teacher(pipe, teacher_steps, inputs.height, inputs.width)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    latents = draw_latents(pipe, inputs, generator)
    noise = sampler_noise(pipe, latents, inputs.model.process, float(teacher_schedule.times[0]))
    result = search(inputs.model, noise, steps, cond=inputs.cond, teacher_grid=teacher_schedule, seed=seed,
                    **from_flat(search_options))
    recorded = {**inputs.metadata, "seed": int(seed)}
    for schedule in [result.schedule, result.teacher] + list(result.per_sample or []):
        schedule.metadata["diffusers"] = dict(recorded)
    return result


def sample_pipeline(pipe: Any, prompts: Prompts, schedule: Schedule, guidance_scale: Optional[float] = None,
                    height: Optional[int] = None, width: Optional[int] = None, generator: Any = None,
                    solver: str = "euler", *, negative_prompt: Union[str, Sequence[str], None] = None,
                    images_per_prompt: int = 1, true_cfg_scale: Optional[float] = None,
                    num_frames: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """Run `schedule` with the project's sampler on the pipeline's model, conditions and initial latents
    (drawn as the pipeline draws them from `generator`), returning the final latents as
    `pipe(..., output_type="latent")` would (Flux: packed). With solver="euler" and a generator of the same
    seed this equals `pipe(..., **pipeline_kwargs(schedule, pipe))`; it also runs schedules searched for
    heun / dpmpp2m, and pipelines that take no custom schedule (DiT, Wan)."""
    family = pipeline_family(pipe)
    get_solver(solver)
    inputs = pipeline_inputs(pipe, prompts, guidance_scale, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                             num_frames=num_frames)
    process = inputs.model.process
    schedule = _in_process(schedule, process)
    current = _current_settings(pipe, family, inputs.height, inputs.width, inputs.metadata["guidance_scale"],
                                inputs.num_frames)
    _warn_settings(schedule, current, solver, "sample_pipeline")
    config = pipe.scheduler.config
    if family not in FLOW_FAMILIES and (config.get("clip_sample") or config.get("thresholding")):
        warnings.warn(f"{type(pipe.scheduler).__name__} clips or thresholds x0 (clip_sample / thresholding); "
                      "sample_pipeline solves the ODE without it", SettingsWarning, stacklevel=2)
    latents = draw_latents(pipe, inputs, generator)
    noise = sampler_noise(pipe, latents, process, float(schedule.times[0]))
    return sample(inputs.model, noise, schedule, solver=solver, cond=inputs.cond, progress=progress).samples


# ----------------------------------------------------------------------------------- the CLI

def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`PATH_OR_ID[,dtype=bfloat16][,device=cuda]` -> (path or id, options)."""
    ident, _, rest = spec.partition(",")
    if not ident:
        raise OptimalStepsError("diffusers model spec needs a path or hub id: diffusers:PATH_OR_ID")
    options = {}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("dtype", "device"):
            raise OptimalStepsError(f"diffusers option {part!r} is not dtype=... or device=...")
        options[key.strip()] = value.strip()
    return ident, options


def _pipeline_class_name(ident: str) -> Optional[str]:
    """The pipeline class a local folder or hub id declares in model_index.json, read before any weights."""
    index = Path(ident) / "model_index.json"
    if index.is_file():
        return _read_json(index).get("_class_name")
    if Path(ident).exists():
        raise OptimalStepsError(f"{ident} is not a diffusers pipeline folder (no model_index.json)")
    diffusers = _require_diffusers()
    try:
        return diffusers.DiffusionPipeline.load_config(ident).get("_class_name")
    except Exception as exc:  # hub / offline errors: report in one line
        raise OptimalStepsError(f"could not read the diffusers pipeline {ident!r}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OptimalStepsError(f"{path} is not readable JSON: {exc}") from None


def _precheck_size(ident: str, class_name: str, height: Optional[int], width: Optional[int]) -> None:
    """Refuse a resolution from a local folder's component configs, before gigabytes of weights load."""
    folder = Path(ident)
    net_file = next((folder / part / "config.json" for part in ("transformer", "unet")
                     if (folder / part / "config.json").is_file()), None)
    if net_file is None or height is None or width is None:
        return  # checked once the pipeline is loaded, where its defaults are known
    family = FAMILIES[class_name]
    vae_file = folder / "vae" / "config.json"
    blocks = _read_json(vae_file).get("block_out_channels") if vae_file.is_file() else None
    vae_scale_factor = 2 ** (len(blocks) - 1) if blocks else 8  # the pipelines' own rule, 8 without a VAE
    _check_size(class_name, _size_rules(family, vae_scale_factor, _read_json(net_file)), height, width)


def load_pipeline(spec: str, height: Optional[int] = None, width: Optional[int] = None) -> Any:
    """A supported pipeline from `PATH_OR_ID[,dtype=...][,device=...]`. The class (and, for a local folder,
    the resolution) is checked before any weights load."""
    diffusers = _require_diffusers()
    ident, options = parse_spec(spec)
    class_name = _pipeline_class_name(ident)
    if class_name not in FAMILIES:
        raise OptimalStepsError(f"{class_name} is not supported; supported pipelines: {', '.join(FAMILIES)}")
    if Path(ident).is_dir():
        _precheck_size(ident, class_name, height, width)
    dtype = None
    if "dtype" in options:
        dtype = getattr(torch, options["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise OptimalStepsError(f"unknown dtype {options['dtype']!r}")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(ident, torch_dtype=dtype)
        if "device" in options:
            pipe = pipe.to(options["device"])
    except Exception as exc:  # a broken or unreachable checkpoint: one line, no traceback
        raise OptimalStepsError(f"could not load diffusers pipeline {ident!r}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusers_model(spec: str, prompts: Prompts, guidance: Optional[float] = None, height: Optional[int] = None,
                         width: Optional[int] = None, seed: int = 0, samples: Optional[int] = None, *,
                         negative_prompt: Optional[str] = None, num_frames: Optional[int] = None
                         ) -> tuple[Any, torch.Tensor, dict, dict]:
    """(model, noise, cond, metadata) for the CLI's search / compare with --model diffusers:SPEC: each prompt
    gets ceil(samples / prompts) initial latents, drawn as the pipeline draws them from `seed`. The model
    also offers `teacher_schedule(teacher_steps)`, the pipeline's default teacher grid."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not texts:
        raise OptimalStepsError("a diffusers model needs at least one --prompt (or --prompts-file)")
    per_prompt = max(1, math.ceil((samples or len(texts)) / len(texts)))
    pipe = load_pipeline(spec, height, width)
    inputs = pipeline_inputs(pipe, texts, guidance, height, width, negative_prompt=negative_prompt,
                             images_per_prompt=per_prompt, num_frames=num_frames)
    model = inputs.model
    model.spec = f"diffusers:{parse_spec(spec)[0]}"
    model.teacher_schedule = lambda teacher_steps: pipeline_teacher(pipe, teacher_steps, inputs.height, inputs.width)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = sampler_noise(pipe, draw_latents(pipe, inputs, generator), model.process, model.process.t_start)
    return model, noise, inputs.cond, {"diffusers": {**inputs.metadata, "seed": int(seed)}}
