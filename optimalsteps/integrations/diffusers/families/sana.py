"""SANA: latents [B, C, H, W] in float32, the network's timestep is sigma * 1000 * `timestep_scale`, CFG batched
as [negative, positive] with the text masks; learned-sigma channels are dropped. Its `__call__` snaps the size
to an aspect-ratio bin of its transformer's sample size unless `use_resolution_binning=False`. SANA ships a
DPM-Solver scheduler: `pipeline_kwargs` needs FlowMatchEulerDiscreteScheduler (or `sample_pipeline`)."""

from __future__ import annotations

from typing import Any

import torch

from ....core.errors import OptimalStepsError
from ..common import (CallOptions, Guidance, PipelineModel, call_default, device_of, given_embeddings, lora_scale,
                      sequence_length, with_negatives)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class SanaModel(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = self.flow_timestep(t) * self.net.config.timestep_scale
        out = self.net(x.to(self.dtype), encoder_hidden_states=cond["prompt_embeds"].to(self.dtype),
                       encoder_attention_mask=cond["prompt_attention_mask"], timestep=timestep, return_dict=False,
                       attention_kwargs=self.attention)[0].float()
        channels = self.net.config.in_channels
        return out[:, :channels] if self.net.config.out_channels // 2 == channels else out


def _bins(sample_size: int) -> Any:
    from diffusers.pipelines.sana import pipeline_sana as sana

    bins = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
            16: "ASPECT_RATIO_512_BIN"}
    if sample_size not in bins:
        raise OptimalStepsError(f"SANA's resolution binning has no bins for sample_size {sample_size}; pass "
                                "use_resolution_binning=False")
    return getattr(sana, bins[sample_size])


class Sana(Family):
    name = "sana"
    label = "SANA (SanaTransformer2DModel)"
    denoisers = ("SanaTransformer2DModel",)
    batched_cfg = True
    packed = False
    steps_only = True

    def vae_scale_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        binning = options.use_resolution_binning
        if not (call_default(pipe, "use_resolution_binning") if binning is None else binning):
            return height, width
        return tuple(pipe.image_processor.classify_height_width_bin(
            height, width, ratios=_bins(pipe.transformer.config.sample_size)))

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            c.texts, cfg, negative_prompt=negatives(options.negative_prompt, c.count) or "",
            num_images_per_prompt=request.per_prompt, device=device_of(pipe),
            **given_embeddings(c.embeds, "prompt_embeds", "prompt_attention_mask"),
            max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        return with_negatives(cfg, prompt_embeds=(embeds, neg), prompt_attention_mask=(mask, neg_mask))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        # SANA's latents are float32 whatever the network's dtype
        return self.flow_model(SanaModel, pipe, request, cond, Guidance(request.scale, batched=True),
                               self.image_latent_shape(pipe, request), latents_dtype=torch.float32)

