"""QwenImage: packed latents [B, seq, 4C] with per-token text masks; true CFG (`true_cfg_scale`, default 4,
on when a negative prompt is given) as a second call, rescaled to the conditional prediction's norm.
QwenImage Img2Img and Inpaint: img2img and inpainting as `img2img` writes them, their image encoded by the
QwenImage VAE as one video frame (its sample, normalised by the latents' mean and std)."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ..common import (CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_default, device_of,
                      guidance_embedding, sequence_length)
from ..family import Family, Request
from ..img2img import ImageToImage, Inpainting, KeepUnmasked, image_variant, pixels, refuse_image_pipelines
from ..prompts import has_negative, negatives


class QwenImageModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], embedded_guidance: Optional[float], img_shapes: list[tuple[int, int, int]]):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.embedded_guidance, self.img_shapes = embedded_guidance, img_shapes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n = x.shape[0]
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        guidance = guidance_embedding(self.embedded_guidance, n, x.device)
        h = x.to(self.dtype)
        if "image_latents" in cond:  # Edit: the reference image's tokens after the noisy ones
            h = torch.cat([h, cond["image_latents"].to(self.dtype)], dim=1)
        out = self.net(hidden_states=h, timestep=timestep, guidance=guidance,
                       encoder_hidden_states_mask=cond.get("prompt_embeds_mask"),
                       encoder_hidden_states=cond["prompt_embeds"], img_shapes=[self.img_shapes] * n,
                       attention_kwargs=self.attention or {}, return_dict=False)[0]
        return out[:, : x.shape[1]]


def true_cfg(pipe: Any, options: CallOptions) -> float:
    value = options.true_cfg_scale if options.true_cfg_scale is not None else call_default(pipe, "true_cfg_scale")
    return 1.0 if value is None else float(value)


class QwenImageInpaintModel(KeepUnmasked, QwenImageModel):
    """QwenImage Inpaint's model: the unmasked latents stay on the image's noising line (see `img2img`)."""


class QwenImage(Family):
    name = "qwenimage"
    label = ("QwenImage (QwenImageTransformer2DModel: QwenImagePipeline, QwenImageImg2ImgPipeline, "
             "QwenImageInpaintPipeline)")
    denoisers = ("QwenImageTransformer2DModel",)
    model_class: ClassVar[type[QwenImageModel]] = QwenImageModel

    def variant(self, pipe: Any) -> Family:
        return image_variant(pipe, self, QwenImageImg2Img, QwenImageInpaint)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        refuse_image_pipelines(pipe, self)

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def prompt_inputs(self, request: Request) -> dict[str, Any]:
        """encode_prompt's arguments besides the text (the Edit pipelines' reference image)."""
        return {}

    def _encode(self, pipe: Any, request: Request, texts: Any, embeds: Any,
                mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(prompt=texts, prompt_embeds=embeds, prompt_embeds_mask=mask,
                                          device=device_of(pipe), num_images_per_prompt=request.per_prompt,
                                          max_sequence_length=sequence_length(pipe, request.options),
                                          **self.prompt_inputs(request))
        # no mask is an all-ones mask; one is kept so the negative branch never inherits the positive's
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, options = request.conditioning, request.options
        embeds, mask = self._encode(pipe, request, c.texts, c.embeds.get("prompt_embeds"),
                                    c.embeds.get("prompt_embeds_mask"))
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if true_cfg(pipe, options) > CFG_THRESHOLD and has_negative(c, options.negative_prompt):
            neg, neg_mask = self._encode(pipe, request, negatives(options.negative_prompt, c.count),
                                         c.embeds.get("negative_prompt_embeds"),
                                         c.embeds.get("negative_prompt_embeds_mask"))
            cond.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        vsf = self.vae_scale_factor(pipe)
        h, w = request.height // vsf // 2, request.width // vsf // 2
        config = pipe.transformer.config
        embedded = request.scale if config.guidance_embeds else None
        guidance = Guidance(true_cfg(pipe, request.options), renorm=True)
        return self.flow_model(self.model_class, pipe, request, cond, guidance, (h * w, config.in_channels), embedded,
                               [(1, h, w)] + request.extras.get("image_shapes", []))


class QwenImageImg2Img(ImageToImage, QwenImage):
    """QwenImageImg2ImgPipeline: img2img (see `img2img`); its image is pixels the VAE encodes."""

    label = "QwenImage Img2Img (QwenImageImg2ImgPipeline: image and strength)"
    pixels_only = True

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return vae_frame_latents(pipe, image, inputs, generator)


class QwenImageInpaint(Inpainting, QwenImageImg2Img):
    """QwenImageInpaintPipeline: inpainting (see `img2img`); the image and mask are pixels."""

    label = "QwenImage Inpaint (QwenImageInpaintPipeline: image, mask_image, strength)"
    model_class = QwenImageInpaintModel


def vae_frame_latents(pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
    """An img2img image's latents [B, C, h, w] as the QwenImage pipelines encode it: one video frame through the
    VAE, sampled from `generator`, normalised by the latents' mean and std."""
    with torch.no_grad():
        return pipe._encode_vae_image(image=pixels(pipe, image, inputs).unsqueeze(2), generator=generator)[:, :, 0]
