"""Flux 2 (Flux2Pipeline: distilled guidance embedding; Flux2KleinPipeline: CFG as a second call unless
distilled). Packed latents with 4-d position ids. Its mu follows the resolution AND the step count, so a
schedule handed as `sigmas` comes with the `num_inference_steps` that makes the pipeline shift it as undone.
Reference images (`image=`, PIL pictures): each is fitted to at most 1024 x 1024 pixels, encoded by the VAE (its
mode: no noise is drawn) and packed; their tokens follow the noisy ones (position ids with time coordinate
10, 20, ...) and the output is cut back to the noisy tokens. Without height / width the call runs at the first
picture's size."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CallOptions, Guidance, PipelineModel, call_parameters, device_of, guidance_embedding,
                      image_list, sequence_length)
from ..family import Family, Request

# the pipeline shrinks a reference picture larger than this many pixels to it
_MAX_AREA = 1024 * 1024
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
        embeds, h = cond["prompt_embeds"], x.to(self.net.dtype)
        if "image_latents" in cond:  # reference images: their tokens after the noisy ones
            h = torch.cat([h, cond["image_latents"].to(self.net.dtype)], dim=1)
        out = self.net(hidden_states=h, timestep=timestep, guidance=guidance, encoder_hidden_states=embeds,
                       txt_ids=self.text_ids(embeds).to(x.device), img_ids=self.latent_ids.expand(n, -1, -1),
                       joint_attention_kwargs=self.attention, return_dict=False)[0]
        return out[:, : x.shape[1]]


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
        if any(name in call_parameters(pipe) for name in ("mask_image", "strength")):  # Klein Inpaint
            raise OptimalStepsError(f"{type(pipe).__name__} (inpainting) is not reproduced yet; of the Flux 2 "
                                    "pipelines, Flux2Pipeline and Flux2KleinPipeline are (with reference images)")
        if options.image is None:
            return
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE to encode reference images")
        for picture in image_list(options.image):
            try:
                pipe.image_processor.check_image_input(picture)
            except ValueError as exc:  # not a PIL image, smaller than 64 pixels a side, too narrow
                raise OptimalStepsError(f"{type(pipe).__name__} reference image: {exc}") from None

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        if options.image is None:
            return height, width
        first_height, first_width = _condition_size(pipe, _fitted(pipe, image_list(options.image)[0]))
        return (first_height if height is None else height), (first_width if width is None else width)

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
        if request.options.image is not None:
            pixels = [_preprocessed(pipe, picture) for picture in image_list(request.options.image)]
            # the VAE's mode: the generator is not drawn from
            cond["image_latents"], image_ids = pipe.prepare_image_latents(
                pixels, c.count * request.per_prompt, torch.Generator(device="cpu").manual_seed(0), device_of(pipe),
                pipe.vae.dtype)
            request.extras["image_ids"] = image_ids[:1]
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        dtype = cond["prompt_embeds"].dtype
        config = pipe.transformer.config
        _, latent_ids = pipe.prepare_latents(1, config.in_channels // 4, request.height, request.width, dtype,
                                             device_of(pipe), torch.Generator().manual_seed(0))
        embedded = request.scale if request.kind == "distilled" else None
        guidance = Guidance(request.scale if request.kind == "cfg" else 1.0)
        ids = latent_ids[:1]
        if "image_ids" in request.extras:
            ids = torch.cat([ids, request.extras["image_ids"].to(ids.device)], dim=1)
        return self.flow_model(Flux2Model, pipe, request, cond, guidance, (latent_ids.shape[1], config.in_channels),
                               embedded, ids, type(pipe)._prepare_text_ids)



def _fitted(pipe: Any, picture: Any) -> Any:
    """A reference picture as the pipeline fits it: shrunk to _MAX_AREA pixels if larger."""
    width, height = picture.size
    return pipe.image_processor._resize_to_target_area(picture, _MAX_AREA) if width * height > _MAX_AREA else picture


def _preprocessed(pipe: Any, picture: Any) -> torch.Tensor:
    """The picture's pixels as the pipeline encodes them: fitted, cropped to multiples of the packed patch."""
    fitted = _fitted(pipe, picture)
    height, width = _condition_size(pipe, fitted)
    return pipe.image_processor.preprocess(fitted, height=height, width=width, resize_mode="crop")


def _condition_size(pipe: Any, fitted: Any) -> tuple[int, int]:
    """(height, width) of a fitted picture, floored to multiples of the packed latent patch."""
    multiple = pipe.vae_scale_factor * 2
    width, height = fitted.size
    return height // multiple * multiple, width // multiple * multiple


def pipe_default_steps(pipe: Any) -> int:
    from ..common import call_default

    return int(call_default(pipe, "num_inference_steps") or 50)
