"""Chroma: Flux-like packed latents without pooled embeddings or a guidance embedding; text attention masks
extended over the image tokens; CFG (`guidance_scale` > 1) as a second call."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..common import Guidance, PipelineModel, device_of, given_embeddings, lora_scale, sequence_length
from ..family import Family, Request
from ..prompts import check_unconditional, negatives
from .flux import packed_latents


class ChromaModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], img_ids: torch.Tensor):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.img_ids = img_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        embeds, mask = cond["prompt_embeds"], cond.get("prompt_attention_mask")
        if mask is not None:  # the pipeline extends the text mask over the image tokens
            mask = torch.cat([mask, torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)
        return self.net(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=embeds,
                        txt_ids=txt_ids, img_ids=self.img_ids, attention_mask=mask,
                        joint_attention_kwargs=self.attention, return_dict=False)[0]


class Chroma(Family):
    name = "chroma"
    label = "Chroma (ChromaTransformer2DModel)"
    denoisers = ("ChromaTransformer2DModel",)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, _, mask, neg, _, neg_mask = pipe.encode_prompt(
            prompt=c.texts, negative_prompt=negatives(options.negative_prompt, c.count), device=device_of(pipe),
            num_images_per_prompt=request.per_prompt, do_classifier_free_guidance=cfg,
            max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options),
            **given_embeddings(c.embeds, "prompt_embeds", "prompt_attention_mask"))
        cond = {"prompt_embeds": embeds}
        if mask is not None:
            cond["prompt_attention_mask"] = mask
        if cfg:
            cond["negative_prompt_embeds"] = neg
            if neg_mask is not None or mask is not None:
                cond["negative_prompt_attention_mask"] = neg_mask if neg_mask is not None else torch.ones(
                    neg.shape[:2], dtype=torch.bool, device=neg.device)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        shape, img_ids = packed_latents(pipe, request, cond["prompt_embeds"].dtype)
        return self.flow_model(ChromaModel, pipe, request, cond, Guidance(request.scale), shape, img_ids)
