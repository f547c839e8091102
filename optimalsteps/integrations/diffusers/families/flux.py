"""Flux.1 (FluxPipeline and the pipelines built on its transformer): packed latents [B, seq, 4C], distilled
guidance as an embedding, optional true CFG (`true_cfg_scale` > 1 with a negative prompt) as a second call."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_parameters, device_of, lora_scale,
                      sequence_length)
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
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((x.shape[0],), self.embedded_guidance, dtype=torch.float32, device=x.device)
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)  # as encode_prompt
        return self.net(hidden_states=x.to(self.dtype), timestep=timestep, guidance=guidance,
                        pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                        txt_ids=txt_ids, img_ids=self.img_ids, joint_attention_kwargs=self.attention,
                        return_dict=False)[0]


class Flux(Family):
    name = "flux"
    label = "Flux.1 (FluxTransformer2DModel: FluxPipeline, Kontext without an image)"
    denoisers = ("FluxTransformer2DModel",)
    pooled = True

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        variant = [name for name in _VARIANT_INPUTS if name in _required(pipe)]
        if variant:
            raise OptimalStepsError(f"{type(pipe).__name__} needs {', '.join(variant)}, which the flux family does "
                                    "not reproduce yet")

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, options = request.conditioning, request.options
        common = dict(prompt_2=None, device=device_of(pipe), num_images_per_prompt=request.per_prompt,
                      max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        embeds, pooled, _ = pipe.encode_prompt(prompt=c.texts, prompt_embeds=c.embeds.get("prompt_embeds"),
                                               pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"), **common)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if _true_cfg(options) > CFG_THRESHOLD and has_negative(c, options.negative_prompt):
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=negatives(options.negative_prompt, c.count), prompt_embeds=c.embeds.get("negative_prompt_embeds"),
                pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"), **common)
            cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        dtype = cond["prompt_embeds"].dtype
        vsf = pipe.vae_scale_factor
        h, w = request.height // (vsf * 2), request.width // (vsf * 2)
        img_ids = pipe._prepare_latent_image_ids(1, h, w, device_of(pipe), dtype)
        embedded = request.scale if pipe.transformer.config.guidance_embeds else None
        model = FluxModel(pipe.transformer, Guidance(_true_cfg(request.options)), (h * w, pipe.transformer.config.in_channels),
                          request.spec, pipe.scheduler.config.num_train_timesteps, request.options.attention_kwargs,
                          embedded, img_ids)
        model.dtype = dtype
        return model, dtype


def _true_cfg(options: CallOptions) -> float:
    return 1.0 if options.true_cfg_scale is None else float(options.true_cfg_scale)  # FluxPipeline's default


def _required(pipe: Any) -> set[str]:
    return {name for name in call_parameters(pipe) if name in _VARIANT_INPUTS}
