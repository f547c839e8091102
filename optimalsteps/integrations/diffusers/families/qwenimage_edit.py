"""QwenImage Edit (QwenImageEditPipeline): QwenImage with a reference picture. The picture is resized to about
1024 x 1024 pixels at its own aspect ratio, encoded by the VAE (its mode, normalised by the latents' mean and
std) and packed; its tokens follow the noisy ones in the sequence (a second entry in `img_shapes`) and the
output is cut back to the noisy tokens. The prompt is encoded together with the resized picture (the
vision-language text encoder); precomputed `prompt_embeds` skip that. Without height / width the call
generates at the picture's resized size.

QwenImage Edit Plus (a pipeline whose prepare_latents takes `images`): one prompt with one or more pictures.
Each is encoded by the VAE at about 1024 x 1024 pixels and its tokens follow the noisy ones, in order (one
`img_shapes` entry each); the text encoder sees them at about 384 x 384. Without height / width the call
generates at the last picture's resized size.

QwenImage Edit Inpaint (QwenImageEditInpaintPipeline): inpainting (see `img2img`) of the picture, at its resized
size whatever height / width say; the picture's VAE latents (sampled from the seed) are both the reference tokens
and the image the unmasked region keeps."""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, call_parameters, device_of, image_list
from ..family import Family, Request
from ..img2img import Inpainting, call_strength, noises_an_image
from ..prompts import Conditioning
from .qwenimage import QwenImage, QwenImageInpaintModel, vae_frame_latents

# the pipeline resizes the reference picture to this many pixels, on multiples of this many
_AREA, _ROUND = 1024 * 1024, 32
_CONDITION_AREA = 384 * 384  # Edit Plus: the pictures the text encoder sees
# inputs of other pipelines with the Edit components (inpainting, layers) that change what the transformer sees
_VARIANT_INPUTS = ("mask_image", "strength", "layers")


def reference_size(image: Any, area: int = _AREA) -> tuple[int, int]:
    """(height, width) the pipeline resizes a PIL picture to: `area` pixels at its aspect ratio."""
    w, h = image.size
    ratio = w / h
    width = math.sqrt(area * ratio)
    return round(width / ratio / _ROUND) * _ROUND, round(width / _ROUND) * _ROUND


class QwenImageEdit(QwenImage):
    name = "qwenimage-edit"
    label = ("QwenImage Edit (QwenImageTransformer2DModel with a processor: QwenImageEditPipeline, "
             "QwenImageEditPlusPipeline, QwenImageEditInpaintPipeline)")

    def matches(self, components: dict[str, set[str]]) -> bool:
        return super().matches(components) and "processor" in components

    def variant(self, pipe: Any) -> Family:
        several = tuple(inspect.signature(pipe.prepare_latents).parameters)[:1] == ("images",)
        if noises_an_image(pipe) and "mask_image" in call_parameters(pipe):
            return QwenImageEditInpaint()
        return QwenImageEditPlus() if several else self

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        cls = type(pipe).__name__
        refuse_variants(pipe)
        if options.image is None:
            raise OptimalStepsError(f"{cls} needs image= (the picture to edit)")
        if not isinstance(getattr(options.image, "size", None), tuple):
            raise OptimalStepsError(f"{cls} takes image= as a PIL image, got {type(options.image).__name__}")

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        if options.image is None or (height is not None and width is not None):
            return height, width
        ref_h, ref_w = reference_size(self.size_picture(options.image))
        multiple = self.vae_scale_factor(pipe) * 2
        return (ref_h // multiple * multiple if height is None else height,
                ref_w // multiple * multiple if width is None else width)

    def size_picture(self, image: Any) -> Any:
        """The picture whose resized size the call generates at without height / width."""
        return image

    def prompt_inputs(self, request: Request) -> dict[str, Any]:
        return {"image": request.extras["prompt_image"]}

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        ref_h, ref_w = reference_size(request.options.image)
        resized = pipe.image_processor.resize(request.options.image, ref_h, ref_w)
        request.extras["prompt_image"] = resized
        cond = super().encode(pipe, request)
        pixels = pipe.image_processor.preprocess(resized, ref_h, ref_w).unsqueeze(2)  # one video frame
        batch = request.conditioning.count * request.per_prompt
        # the VAE encodes to its mode, so the generator handed to prepare_latents draws only unused noise
        _, cond["image_latents"] = pipe.prepare_latents(
            pixels, batch, pipe.transformer.config.in_channels // 4, request.height, request.width,
            cond["prompt_embeds"].dtype, device_of(pipe), torch.Generator(device="cpu").manual_seed(0))
        vsf = self.vae_scale_factor(pipe)
        request.extras["image_shapes"] = [(1, ref_h // vsf // 2, ref_w // vsf // 2)]
        return cond

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(None, inputs.batch, self.net(pipe).config.in_channels // 4, inputs.height,
                                    inputs.width, inputs.dtype, device_of(pipe), generator)[0]


class QwenImageEditPlus(QwenImageEdit):
    """QwenImage Edit Plus: several pictures, each VAE-encoded at about 1024 x 1024 pixels, their tokens after the
    noisy ones in order; the pipeline takes one prompt per call."""

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        cls = type(pipe).__name__
        refuse_variants(pipe)
        if options.image is None:
            raise OptimalStepsError(f"{cls} needs image= (a picture, or a list of pictures, to edit)")
        for picture in image_list(options.image):
            if not isinstance(getattr(picture, "size", None), tuple):
                raise OptimalStepsError(f"{cls} takes image= as PIL images, got {type(picture).__name__}")

    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        conditioning = super().conditioning(pipe, prompts, options)
        if conditioning.count != 1:
            raise OptimalStepsError(f"{type(pipe).__name__} takes one prompt per call, got {conditioning.count}")
        return conditioning

    def size_picture(self, image: Any) -> Any:
        return image_list(image)[-1]

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        pictures = image_list(request.options.image)
        request.extras["prompt_image"] = [
            pipe.image_processor.resize(picture, *reference_size(picture, _CONDITION_AREA)) for picture in pictures]
        cond = QwenImage.encode(self, pipe, request)
        sizes = [reference_size(picture) for picture in pictures]
        pixels = [pipe.image_processor.preprocess(picture, h, w).unsqueeze(2)  # one video frame each
                  for picture, (h, w) in zip(pictures, sizes)]
        # the VAE encodes to its mode, so the generator handed to prepare_latents draws only unused noise
        _, cond["image_latents"] = pipe.prepare_latents(
            pixels, request.per_prompt, pipe.transformer.config.in_channels // 4, request.height, request.width,
            cond["prompt_embeds"].dtype, device_of(pipe), torch.Generator(device="cpu").manual_seed(0))
        vsf = self.vae_scale_factor(pipe)
        request.extras["image_shapes"] = [(1, h // vsf // 2, w // vsf // 2) for h, w in sizes]
        return cond


class QwenImageEditInpaint(Inpainting, QwenImageEdit):
    """QwenImageEditInpaintPipeline: one PIL picture and a mask; the call runs at the picture's resized size."""

    label = "QwenImage Edit Inpaint (QwenImageEditInpaintPipeline: image, mask_image, strength)"
    model_class = QwenImageInpaintModel

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        Inpainting.check_options(self, pipe, options)
        if not isinstance(getattr(options.image, "size", None), tuple):
            raise OptimalStepsError(f"{type(pipe).__name__} takes image= as a PIL image, got "
                                    f"{type(options.image).__name__}")

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        own = reference_size(options.image)
        if (height or own[0], width or own[1]) != own:
            # the pipeline generates at the picture's resized size whatever the call says
            raise OptimalStepsError(f"{type(pipe).__name__} runs at its picture's resized size {own[0]}x{own[1]}, "
                                    f"not {height}x{width}")
        return own

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        resized = pipe.image_processor.resize(request.options.image, request.height, request.width)
        vsf = self.vae_scale_factor(pipe)
        request.extras.update(prompt_image=resized, image=resized, mask_image=request.options.mask_image,
                              strength=call_strength(pipe, request.options),
                              image_shapes=[(1, request.height // vsf // 2, request.width // vsf // 2)])
        return QwenImage.encode(self, pipe, request)

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return vae_frame_latents(pipe, image, inputs, generator)

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        latents = super().start(pipe, inputs, generator, sigma_start)
        inputs.cond["image_latents"] = inputs.cond["inpaint_image"]  # the reference tokens: the same sample
        return latents


def refuse_variants(pipe: Any) -> None:
    if any(name in call_parameters(pipe) for name in _VARIANT_INPUTS):
        raise OptimalStepsError(f"{type(pipe).__name__} is not reproduced yet; of the QwenImage Edit pipelines, "
                                "QwenImageEditPipeline, QwenImageEditPlusPipeline and QwenImageEditInpaintPipeline "
                                "are supported")
