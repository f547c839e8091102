"""Lumina 2: latents [B, C, H, W] with text attention masks; the network takes 1 - sigma and predicts minus
the velocity; CFG as a second call, by default (`cfg_normalization`) rescaled to the conditional
prediction's norm over the last axis. Its mu is computed from `latents.shape[1]`, the channel count."""

from __future__ import annotations

from typing import Any

import torch

from ..common import Guidance, PipelineModel, call_default, device_of, given_embeddings, sequence_length, with_negatives
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class Lumina2Model(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = 1 - self.flow_timestep(t) / self.num_train_timesteps
        out = self.net(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                       encoder_attention_mask=cond["prompt_attention_mask"], return_dict=False,
                       attention_kwargs=self.attention)[0]
        return -out


class Lumina2(Family):
    name = "lumina2"
    label = "Lumina 2 (Lumina2Transformer2DModel)"
    denoisers = ("Lumina2Transformer2DModel",)
    packed = False

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": vae_scale_factor * 2}

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        # the pipeline hands calculate_shift latents.shape[1] of unpacked latents: the channels
        return int(pipe.transformer.config.in_channels)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            c.texts, cfg, negative_prompt=negatives(options.negative_prompt, c.count),
            num_images_per_prompt=request.per_prompt, device=device_of(pipe),
            **given_embeddings(c.embeds, "prompt_embeds", "prompt_attention_mask"),
            max_sequence_length=sequence_length(pipe, options))
        return with_negatives(cfg, prompt_embeds=(embeds, neg), prompt_attention_mask=(mask, neg_mask))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        renorm = bool(call_default(pipe, "cfg_normalization"))
        return self.flow_model(Lumina2Model, pipe, request, cond, Guidance(request.scale, renorm=renorm),
                               self.image_latent_shape(pipe, request))
