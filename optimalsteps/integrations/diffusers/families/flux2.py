"""Flux 2 (Flux2Pipeline: distilled guidance embedding; Flux2KleinPipeline: CFG as a second call unless
distilled). Packed latents with 4-d position ids. Its mu follows the resolution AND the step count, so a
schedule handed as `sigmas` comes with the `num_inference_steps` that makes the pipeline shift it as undone."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..common import CallOptions, Guidance, PipelineModel, device_of, guidance_embedding, sequence_length
from ..family import Family, Request
from ..prompts import check_unconditional


class Flux2Model(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], embedded_guidance: Optional[float], latent_ids: torch.Tensor,
                 text_ids: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.embedded_guidance, self.latent_ids, self.text_ids = embedded_guidance, latent_ids, text_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n = x.shape[0]
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        guidance = guidance_embedding(self.embedded_guidance, n, x.device)
        embeds = cond["prompt_embeds"]
        return self.net(hidden_states=x.to(self.net.dtype), timestep=timestep, guidance=guidance,
                        encoder_hidden_states=embeds, txt_ids=self.text_ids(embeds).to(x.device),
                        img_ids=self.latent_ids.expand(n, -1, -1), joint_attention_kwargs=self.attention,
                        return_dict=False)[0]


class Flux2(Family):
    name = "flux2"
    label = "Flux 2 (Flux2Transformer2DModel: Flux2Pipeline, Flux2KleinPipeline)"
    denoisers = ("Flux2Transformer2DModel",)
    steps_set_mu = True

    def vae_scale_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def mu(self, pipe: Any, height: int, width: int, steps: Optional[int]) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        # the pipeline's own empirical fit; `steps` is num_inference_steps of the call (its default otherwise)
        steps = steps if steps is not None else pipe_default_steps(pipe)
        return float(compute_empirical_mu(self.image_seq_len(pipe, height, width), steps))

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        if "is_distilled" in pipe.config:
            return "cfg" if scale > 1.0 and not pipe.config.is_distilled else "none"
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        check_unconditional(pipe, c, cfg)
        common = dict(device=device_of(pipe), num_images_per_prompt=request.per_prompt,
                      max_sequence_length=sequence_length(pipe, request.options))
        embeds, _ = pipe.encode_prompt(prompt=c.texts, prompt_embeds=c.embeds.get("prompt_embeds"), **common)
        cond = {"prompt_embeds": embeds}
        if cfg:
            negative = None if c.texts is None else [""] * len(c.texts)  # Klein's unconditional prompt
            cond["negative_prompt_embeds"], _ = pipe.encode_prompt(
                prompt=negative, prompt_embeds=c.embeds.get("negative_prompt_embeds"), **common)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        dtype = cond["prompt_embeds"].dtype
        config = pipe.transformer.config
        _, latent_ids = pipe.prepare_latents(1, config.in_channels // 4, request.height, request.width, dtype,
                                             device_of(pipe), torch.Generator().manual_seed(0))
        embedded = request.scale if request.kind == "distilled" else None
        guidance = Guidance(request.scale if request.kind == "cfg" else 1.0)
        return self.flow_model(Flux2Model, pipe, request, cond, guidance, (latent_ids.shape[1], config.in_channels),
                               embedded, latent_ids[:1], type(pipe)._prepare_text_ids)


def pipe_default_steps(pipe: Any) -> int:
    from ..common import call_default

    return int(call_default(pipe, "num_inference_steps") or 50)
