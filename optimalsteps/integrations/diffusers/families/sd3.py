"""Stable Diffusion 3 / 3.5: latents [B, C, H, W], CFG batched as [negative, positive] in one call; under
dynamic shifting its `__call__` takes `mu`, which pins the schedule against the call's resolution."""

from __future__ import annotations

from typing import Any

import torch

from ..common import (Guidance, PipelineModel, device_of, given_embeddings, lora_scale, sequence_length,
                      with_negatives)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class SD3Model(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.net(hidden_states=x.to(self.dtype), timestep=self.flow_timestep(t),
                        encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
                        joint_attention_kwargs=self.attention, return_dict=False)[0]


class SD3(Family):
    name = "sd3"
    label = "SD3 (SD3Transformer2DModel)"
    denoisers = ("SD3Transformer2DModel",)
    pooled = True
    batched_cfg = True
    packed = False

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        pixels = vae_scale_factor * net_config["patch_size"]
        return {"multiple": pixels, "patch_pixels": pixels, "limit": net_config.get("pos_embed_max_size")}

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        pixels = self.vae_scale_factor(pipe) * pipe.transformer.config.patch_size
        return (height // pixels) * (width // pixels)

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        if scheduler.config.get("use_dynamic_shifting"):
            scheduler.set_timesteps(steps, mu=self.shift(pipe, height, width, steps)[1]["mu"])
        else:
            scheduler.set_timesteps(steps)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        check_unconditional(pipe, c, cfg)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=c.texts, prompt_2=None, prompt_3=None, device=device_of(pipe),
            num_images_per_prompt=request.per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negatives(request.options.negative_prompt, c.count),
            **given_embeddings(c.embeds, "prompt_embeds", "pooled_prompt_embeds"),
            max_sequence_length=sequence_length(pipe, request.options), lora_scale=lora_scale(request.options))
        return with_negatives(cfg, prompt_embeds=(embeds, neg), pooled_prompt_embeds=(pooled, neg_pooled))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        return self.flow_model(SD3Model, pipe, request, cond, Guidance(request.scale, batched=True),
                               self.image_latent_shape(pipe, request))
