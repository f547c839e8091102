"""AuraFlow: latents [B, C, H, W], timestep sigma (t / 1000), CFG batched as [negative, positive]; its
default `num_inference_steps` path is the flow scheduler's own (shifted twice at the low end, like SD3)."""

from __future__ import annotations

from typing import Any

import torch

from ..common import Guidance, PipelineModel, device_of, lora_scale, sequence_length
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

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": vae_scale_factor * 2}  # what the pipeline's check_inputs demands

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        scheduler.set_timesteps(steps)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, _, neg, _ = pipe.encode_prompt(
            prompt=c.texts, negative_prompt=negatives(options.negative_prompt, c.count),
            do_classifier_free_guidance=cfg, num_images_per_prompt=request.per_prompt, device=device_of(pipe),
            prompt_embeds=c.embeds.get("prompt_embeds"), negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
            prompt_attention_mask=c.embeds.get("prompt_attention_mask"),
            negative_prompt_attention_mask=c.embeds.get("negative_prompt_attention_mask"),
            max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        return {"prompt_embeds": embeds, **({"negative_prompt_embeds": neg} if cfg else {})}

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        dtype = cond["prompt_embeds"].dtype
        vsf = pipe.vae_scale_factor
        shape = (pipe.transformer.config.in_channels, request.height // vsf, request.width // vsf)
        model = AuraFlowModel(pipe.transformer, Guidance(request.scale, batched=True), shape, request.spec,
                              pipe.scheduler.config.num_train_timesteps, request.options.attention_kwargs)
        model.dtype = dtype
        return model, dtype

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, pipe.transformer.config.in_channels, inputs.height, inputs.width,
                                    inputs.dtype, device_of(pipe), generator)
