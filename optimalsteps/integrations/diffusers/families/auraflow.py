"""AuraFlow: latents [B, C, H, W], timestep sigma (t / 1000), CFG batched as [negative, positive]; its
default `num_inference_steps` path is the flow scheduler's own (shifted twice at the low end, like SD3)."""

from __future__ import annotations

from typing import Any

import torch

from ..common import (Guidance, PipelineModel, device_of, given_embeddings, lora_scale, sequence_length,
                      with_negatives)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class AuraFlowModel(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = (self.flow_timestep(t) / 1000).to(self.dtype)
        return self.net(x.to(self.dtype), encoder_hidden_states=cond["prompt_embeds"], timestep=timestep,
                        return_dict=False, attention_kwargs=self.attention)[0]


class AuraFlow(Family):
    name = "auraflow"
    label = "AuraFlow (AuraFlowTransformer2DModel)"
    denoisers = ("AuraFlowTransformer2DModel",)
    batched_cfg = True
    packed = False
    steps_only = True

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": vae_scale_factor * 2}  # what the pipeline's check_inputs demands

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, _, neg, _ = pipe.encode_prompt(
            prompt=c.texts, negative_prompt=negatives(options.negative_prompt, c.count),
            do_classifier_free_guidance=cfg, num_images_per_prompt=request.per_prompt, device=device_of(pipe),
            **given_embeddings(c.embeds, "prompt_embeds", "prompt_attention_mask"),
            max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        return with_negatives(cfg, prompt_embeds=(embeds, neg))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        return self.flow_model(AuraFlowModel, pipe, request, cond, Guidance(request.scale, batched=True),
                               self.image_latent_shape(pipe, request))
