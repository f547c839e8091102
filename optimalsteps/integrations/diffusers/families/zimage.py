"""Z-Image: latents [B, C, H, W] handed to the transformer as a list of [C, 1, H, W]; prompt embeddings are a
list of per-prompt tensors of their own lengths (kept here padded, with their lengths, as per-sample
conditions); the network takes the reversed time (1000 - t) / 1000 and predicts minus the velocity; CFG
(`guidance_scale` > 0) is `pos + s (pos - neg)`, batched, i.e. the usual form with scale 1 + s.
Z-Image Img2Img and Inpaint: img2img and inpainting as `img2img` writes them. The pipeline does not resize its
image: the call runs at the image's size (multiples of 16 pixels, rounded down), and the image is encoded by the
VAE (its sample, shifted and scaled), noised and blended in the prompt embeddings' dtype."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, Guidance, PipelineModel, device_of, image_list, sequence_length
from ..family import Family, Request
from ..img2img import ImageToImage, Inpainting, KeepUnmasked, image_variant, pixels, refuse_image_pipelines
from ..prompts import Conditioning, check_negative, text_conditioning


class ZImageModel(PipelineModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = (1000 - self.flow_timestep(t)) / 1000
        embeds, lengths = cond["prompt_embeds"], cond["prompt_lengths"]
        features = [embeds[i, : int(lengths[i])].to(self.dtype) for i in range(x.shape[0])]
        out = self.net(list(x.to(self.dtype).unsqueeze(2).unbind(0)), timestep, features,
                       joint_attention_kwargs=self.attention, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)


def _padded(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = embeds[0].new_zeros((len(embeds), length, embeds[0].shape[-1]))
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out, torch.tensor([e.shape[0] for e in embeds], dtype=torch.long)


def _as_list(name: str, value: Any) -> list[torch.Tensor]:
    items = list(value.unbind(0)) if isinstance(value, torch.Tensor) and value.dim() == 3 else value
    if not isinstance(items, (list, tuple)) or not items or not all(
            isinstance(e, torch.Tensor) and e.dim() == 2 and e.is_floating_point() for e in items):
        raise OptimalStepsError(f"{name} must be a list of [tokens, dim] tensors (one per prompt)")
    return list(items)


class ZImageInpaintModel(KeepUnmasked, ZImageModel):
    """Z-Image Inpaint's model: the unmasked latents stay on the image's noising line (see `img2img`)."""


class ZImage(Family):
    name = "zimage"
    label = "Z-Image (ZImageTransformer2DModel: ZImagePipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline)"
    denoisers = ("ZImageTransformer2DModel",)
    batched_cfg = True
    packed = False
    model_class: ClassVar[type[ZImageModel]] = ZImageModel

    def variant(self, pipe: Any) -> Family:
        return image_variant(pipe, self, ZImageImg2Img, ZImageInpaint)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        refuse_image_pipelines(pipe, self)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 1024, 1024  # the pipeline's own default

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": vae_scale_factor * 2}

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        latent = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        return (latent[0] // 2) * (latent[1] // 2)

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "cfg" if scale > 0 else "none"

    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        if not isinstance(prompts, dict):
            return text_conditioning(pipe, prompts, options.negative_prompt, False, False)
        unknown = sorted(set(prompts) - {"prompt_embeds", "negative_prompt_embeds"})
        if unknown or "prompt_embeds" not in prompts:
            raise OptimalStepsError("Z-Image embeddings are prompt_embeds (and negative_prompt_embeds), got "
                                    f"{sorted(prompts)}")
        embeds = {k: _as_list(k, v) for k, v in prompts.items()}
        count = len(embeds["prompt_embeds"])
        if "negative_prompt_embeds" in embeds and len(embeds["negative_prompt_embeds"]) != count:
            raise OptimalStepsError(f"{len(embeds['negative_prompt_embeds'])} negative embeddings for {count} prompts")
        check_negative(options.negative_prompt, count)
        return Conditioning(None, embeds, None, count)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        positive, negative = c.embeds.get("prompt_embeds"), c.embeds.get("negative_prompt_embeds")
        if c.texts is not None:
            positive, negative = pipe.encode_prompt(
                prompt=c.texts, device=device_of(pipe), do_classifier_free_guidance=cfg,
                negative_prompt=request.options.negative_prompt,
                max_sequence_length=sequence_length(pipe, request.options))
        elif cfg and negative is None:
            raise OptimalStepsError("Z-Image guidance with prompt embeddings needs negative_prompt_embeds")
        repeat = request.per_prompt
        lists = [[e for e in group for _ in range(repeat)] for group in ([positive, negative] if cfg else [positive])]
        length = max(e.shape[0] for group in lists for e in group)
        cond = dict(zip(("prompt_embeds", "prompt_lengths"), _padded(lists[0], length)))
        if cfg:
            cond.update(zip(("negative_prompt_embeds", "negative_prompt_lengths"), _padded(lists[1], length)))
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        vsf = pipe.vae_scale_factor
        shape = (pipe.transformer.in_channels, 2 * (request.height // (vsf * 2)), 2 * (request.width // (vsf * 2)))
        guidance = Guidance(1.0 + request.scale, batched=True, positive_first=True)
        return self.flow_model(self.model_class, pipe, request, cond, guidance, shape, latents_dtype=torch.float32)




class ZImageImg2Img(ImageToImage, ZImage):
    """ZImageImg2ImgPipeline: img2img (see `img2img`) at its image's size; the image is pixels the VAE encodes."""

    label = "Z-Image Img2Img (ZImageImg2ImgPipeline: image and strength)"
    pixels_only = True

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        if options.image is None:
            return height, width
        own = tuple(pipe.image_processor.get_default_height_width(image_list(options.image)[0]))
        if (height or own[0], width or own[1]) != own:
            # the pipeline noises the unresized image's latents: any other size fails there
            raise OptimalStepsError(f"{type(pipe).__name__} runs at its image's size {own[0]}x{own[1]} (it does not "
                                    f"resize it), not {height}x{width}")
        return own

    def start_dtype(self, pipe: Any, inputs: Any) -> torch.dtype:
        return inputs.cond["prompt_embeds"].dtype

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        config = pipe.vae.config
        with torch.no_grad():
            latents = pipe.vae.encode(pixels(pipe, image, inputs, self.start_dtype(pipe, inputs))).latent_dist
            return (latents.sample(generator=generator) - config.shift_factor) * config.scaling_factor


class ZImageInpaint(Inpainting, ZImageImg2Img):
    """ZImageInpaintPipeline: inpainting (see `img2img`) at its image's size; the image and mask are pixels."""

    label = "Z-Image Inpaint (ZImageInpaintPipeline: image, mask_image, strength)"
    model_class = ZImageInpaintModel
