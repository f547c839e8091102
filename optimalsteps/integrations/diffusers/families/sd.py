"""Stable Diffusion 1.x / 2.x and SDXL: a UNet on VE states (the scheduler's own sigma table), input
x / sqrt(sigma^2 + 1) at the fractional timestep of sigma, CFG batched as [negative, positive]; SDXL's pooled
text embeddings and size conditioning are per-sample conditions."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CallOptions, Guidance, PipelineModel, device_of, given_embeddings, lora_scale, per_sample,
                      with_negatives)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives
from ..tables import SigmaTable, discrete_prediction, discrete_x0


class UNetModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, table: SigmaTable,
                 prediction_type: str, attention: Optional[dict]):
        super().__init__(net, guidance, sample_shape, spec, attention=attention)
        self.table, self.prediction_type = table, prediction_type
        self.prediction, self.process = discrete_prediction(prediction_type), table.process

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        sigma = per_sample(t.to(torch.float32), x)
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.net((x / (sigma**2 + 1) ** 0.5).to(self.dtype), self.table.timestep(t),
                        encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                        cross_attention_kwargs=self.attention, return_dict=False)[0]

    def finish(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return discrete_x0(self.prediction_type, out.to(x.dtype), x, per_sample(t.to(torch.float32), x))


class SD(Family):
    name = "sd"
    label = "SD 1.x/2.x (UNet2DConditionModel)"
    denoisers = ("UNet2DConditionModel",)
    denoiser = "unet"
    flow = False
    batched_cfg = True
    packed = False

    def matches(self, components: dict[str, set[str]]) -> bool:
        # a text-conditioned UNet pipeline (DDPMPipeline's UNet takes no prompts)
        return (super().matches(components) and "text_encoder" in components
                and "tokenizer_2" not in components and "text_encoder_2" not in components)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size, vsf = pipe.unet.config.sample_size, self.vae_scale_factor(pipe)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * vsf, w * vsf

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": 8}  # what the pipelines' check_inputs demand

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise OptimalStepsError("UNets with a guidance embedding (time_cond_proj_dim, LCM) are not supported")
        return super().guidance(pipe, scale, options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        check_unconditional(pipe, c, cfg)
        embeds, neg = pipe.encode_prompt(c.texts, device_of(pipe), request.per_prompt, cfg,
                                         negatives(request.options.negative_prompt, c.count),
                                         lora_scale=lora_scale(request.options),
                                         **given_embeddings(c.embeds, "prompt_embeds"))
        return with_negatives(cfg, prompt_embeds=(embeds, neg))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        shape = self.image_latent_shape(pipe, request)
        model = UNetModel(pipe.unet, Guidance(request.scale, batched=True), shape, request.spec,
                          SigmaTable.of(pipe.scheduler), pipe.scheduler.config.get("prediction_type", "epsilon"),
                          request.options.attention_kwargs)
        return model, cond["prompt_embeds"].dtype

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # the pipeline scales by the scheduler's init_noise_sigma afterwards (see sampler_noise)
        return randn_tensor((inputs.batch,) + tuple(inputs.model.sample_shape), generator=generator,
                            device=device_of(pipe), dtype=inputs.dtype)


class SDXL(SD):
    name = "sdxl"
    label = "SDXL (UNet2DConditionModel with a second text encoder)"
    pooled = True

    def matches(self, components: dict[str, set[str]]) -> bool:
        return Family.matches(self, components) and ("tokenizer_2" in components or "text_encoder_2" in components)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        check_unconditional(pipe, c, cfg)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=c.texts, prompt_2=None, device=device_of(pipe), num_images_per_prompt=request.per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negatives(request.options.negative_prompt, c.count),
            negative_prompt_2=None, lora_scale=lora_scale(request.options),
            **given_embeddings(c.embeds, "prompt_embeds", "pooled_prompt_embeds"))
        projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        try:
            time_ids = pipe._get_add_time_ids((request.height, request.width), (0, 0), (request.height, request.width),
                                              dtype=embeds.dtype, text_encoder_projection_dim=projection)
        except ValueError as exc:
            raise OptimalStepsError(f"SDXL size conditioning does not fit this UNet: {exc}") from None
        cond = {"prompt_embeds": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(device_of(pipe)).repeat(embeds.shape[0], 1)}
        if cfg:
            cond.update(negative_prompt_embeds=neg, negative_text_embeds=neg_pooled)
        return cond

