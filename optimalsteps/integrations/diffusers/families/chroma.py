"""Chroma: Flux-like packed latents without pooled embeddings or a guidance embedding; text attention masks
extended over the image tokens; CFG (`guidance_scale` > 1) as a second call.
Chroma Img2Img and Inpaint: img2img and inpainting as `img2img` writes them, their image encoded by the VAE
(its sample, shifted and scaled)."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ..common import CallOptions, Guidance, PipelineModel, device_of, given_embeddings, lora_scale, sequence_length
from ..family import Family, Request
from ..img2img import ImageToImage, Inpainting, KeepUnmasked, image_variant, pixels, refuse_image_pipelines
from ..prompts import check_unconditional, negatives
from .flux import packed_latents


class ChromaModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], img_ids: torch.Tensor, float_mask: bool = False):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.img_ids, self.float_mask = img_ids, float_mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        embeds, mask = cond["prompt_embeds"], cond.get("prompt_attention_mask")
        if mask is not None:  # the pipeline extends the text mask over the image tokens
            mask = torch.cat([mask, torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
            if self.float_mask:  # Img2Img / Inpaint cast it to the latents' dtype: the attention adds it
                mask = mask.to(self.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)
        return self.net(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=embeds,
                        txt_ids=txt_ids, img_ids=self.img_ids, attention_mask=mask,
                        joint_attention_kwargs=self.attention, return_dict=False)[0]


class ChromaInpaintModel(KeepUnmasked, ChromaModel):
    """Chroma Inpaint's model: the unmasked latents stay on the image's noising line (see `img2img`)."""


class Chroma(Family):
    name = "chroma"
    label = "Chroma (ChromaTransformer2DModel: ChromaPipeline, ChromaImg2ImgPipeline, ChromaInpaintPipeline)"
    denoisers = ("ChromaTransformer2DModel",)
    model_class: ClassVar[type[ChromaModel]] = ChromaModel
    float_mask: ClassVar[bool] = False  # the pipeline hands the transformer its text mask in the latents' dtype

    def variant(self, pipe: Any) -> Family:
        return image_variant(pipe, self, ChromaImg2Img, ChromaInpaint)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        refuse_image_pipelines(pipe, self)

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
        return self.flow_model(self.model_class, pipe, request, cond, Guidance(request.scale), shape, img_ids,
                               self.float_mask)


class ChromaImg2Img(ImageToImage, Chroma):
    """ChromaImg2ImgPipeline: img2img (see `img2img`); its image is pixels the VAE encodes."""

    label = "Chroma Img2Img (ChromaImg2ImgPipeline: image and strength)"
    pixels_only = True
    float_mask = True

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe._encode_vae_image(image=pixels(pipe, image, inputs), generator=generator)


class ChromaInpaint(Inpainting, ChromaImg2Img):
    """ChromaInpaintPipeline: inpainting (see `img2img`); the image and mask are pixels."""

    label = "Chroma Inpaint (ChromaInpaintPipeline: image, mask_image, strength)"
    model_class = ChromaInpaintModel
