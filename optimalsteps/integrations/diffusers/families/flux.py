"""Flux.1 (FluxPipeline and the pipelines built on its transformer): packed latents [B, seq, 4C], distilled
guidance as an embedding, optional true CFG (`true_cfg_scale` > 1 with a negative prompt) as a second call.
Flux Kontext: the reference image's packed latents follow the noisy ones in the sequence (position ids
with first coordinate 1), the output is cut back to the noisy tokens, and the call's size is fitted to
`max_area`."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_default, call_parameters, device_of,
                      guidance_embedding, lora_scale, sequence_length)
from ..family import Family, Request
from ..prompts import has_negative, negatives

# inputs of the Flux variants that change what the transformer sees; not reproduced yet
_VARIANT_INPUTS = ("mask_image", "control_image", "strength")


class FluxModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], embedded_guidance: Optional[float], img_ids: torch.Tensor):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.embedded_guidance, self.img_ids = embedded_guidance, img_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # the pipeline casts the timestep to the latents' dtype, then hands the transformer timestep / 1000
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        guidance = guidance_embedding(self.embedded_guidance, x.shape[0], x.device)
        embeds, h = cond["prompt_embeds"], x.to(self.dtype)
        if "image_latents" in cond:  # Kontext: the reference image's tokens after the noisy ones
            h = torch.cat([h, cond["image_latents"].to(self.dtype)], dim=1)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)  # as encode_prompt
        out = self.net(hidden_states=h, timestep=timestep, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=self.img_ids, joint_attention_kwargs=self.attention,
                       return_dict=False)[0]
        return out[:, : x.shape[1]]


class Flux(Family):
    name = "flux"
    label = "Flux.1 (FluxTransformer2DModel: FluxPipeline, FluxKontextPipeline)"
    denoisers = ("FluxTransformer2DModel",)
    pooled = True

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is not None and not _kontext(pipe):
            raise OptimalStepsError(f"image inputs of {type(pipe).__name__} are not supported (Flux Kontext's are)")
        variant = [name for name in _VARIANT_INPUTS if name in _required(pipe)]
        if variant:
            raise OptimalStepsError(f"{type(pipe).__name__} needs {', '.join(variant)}, which the flux family does "
                                    "not reproduce yet")

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        if "max_area" not in call_parameters(pipe):
            return height, width
        area = options.max_area if options.max_area is not None else call_default(pipe, "max_area")
        # the pipeline keeps the aspect ratio at `area` pixels, on multiples of the packed latent patch
        ratio, multiple = width / height, pipe.vae_scale_factor * 2
        return (round((area / ratio) ** 0.5) // multiple * multiple,
                round((area * ratio) ** 0.5) // multiple * multiple)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, options = request.conditioning, request.options
        common = dict(prompt_2=None, device=device_of(pipe), num_images_per_prompt=request.per_prompt,
                      max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        embeds, pooled, _ = pipe.encode_prompt(prompt=c.texts, prompt_embeds=c.embeds.get("prompt_embeds"),
                                               pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"), **common)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if _true_cfg(options) > CFG_THRESHOLD and has_negative(c, options.negative_prompt):
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=negatives(options.negative_prompt, c.count),
                prompt_embeds=c.embeds.get("negative_prompt_embeds"),
                pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"), **common)
            cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        if options.image is not None:
            cond["image_latents"], request.extras["image_ids"] = _kontext_latents(pipe, request, embeds)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        shape, img_ids = packed_latents(pipe, request, cond["prompt_embeds"].dtype)
        if "image_latents" in cond:
            img_ids = torch.cat([img_ids, request.extras["image_ids"]], dim=0)
        embedded = request.scale if pipe.transformer.config.guidance_embeds else None
        return self.flow_model(FluxModel, pipe, request, cond, Guidance(_true_cfg(request.options)), shape,
                               embedded, img_ids)

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        if not _kontext(pipe):
            return super().draw(pipe, inputs, generator)
        return pipe.prepare_latents(None, inputs.batch, pipe.transformer.config.in_channels // 4, inputs.height,
                                    inputs.width, inputs.dtype, device_of(pipe), generator)[0]


def packed_latents(pipe: Any, request: Request, dtype: torch.dtype) -> tuple[tuple[int, int], torch.Tensor]:
    """([tokens, channels] of the packed latents at the request's size, their position ids) as the Flux
    pipelines build them."""
    vsf = pipe.vae_scale_factor
    h, w = request.height // (vsf * 2), request.width // (vsf * 2)
    img_ids = pipe._prepare_latent_image_ids(1, h, w, device_of(pipe), dtype)
    return (h * w, pipe.transformer.config.in_channels), img_ids


def _kontext(pipe: Any) -> bool:
    """A Kontext-style pipeline: its prepare_latents takes the reference image first."""
    return next(iter(inspect.signature(pipe.prepare_latents).parameters), None) == "image"


def _kontext_latents(pipe: Any, request: Request, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed reference latents [B, S, C], their position ids) as the Kontext pipeline builds them: a tensor
    with the VAE's latent channels is taken as latents, anything else is resized to the preferred Kontext
    resolution nearest its aspect ratio and encoded by the VAE."""
    image = request.options.image
    if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.latent_channels):
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError("encoding a Kontext image needs the pipeline's VAE; pass latents "
                                    f"[B, {pipe.latent_channels}, h, w] instead")
        image = _kontext_pixels(pipe, image)
    batch = request.conditioning.count * request.per_prompt
    _, latents, _, ids = pipe.prepare_latents(image, batch, pipe.transformer.config.in_channels // 4, request.height,
                                              request.width, embeds.dtype, device_of(pipe),
                                              torch.Generator(device="cpu").manual_seed(0))
    return latents, ids


def _kontext_pixels(pipe: Any, image: Any) -> torch.Tensor:
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    first = image[0] if isinstance(image, list) else image
    h, w = pipe.image_processor.get_default_height_width(first)
    _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    h, w = h // multiple * multiple, w // multiple * multiple
    return pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)


def _true_cfg(options: CallOptions) -> float:
    return 1.0 if options.true_cfg_scale is None else float(options.true_cfg_scale)  # FluxPipeline's default


def _required(pipe: Any) -> set[str]:
    return {name for name in call_parameters(pipe) if name in _VARIANT_INPUTS}
