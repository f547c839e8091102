"""QwenImage Edit (QwenImageEditPipeline): QwenImage with a reference picture. The picture is resized to about
1024 x 1024 pixels at its own aspect ratio, encoded by the VAE (its mode, normalised by the latents' mean and
std) and packed; its tokens follow the noisy ones in the sequence (a second entry in `img_shapes`) and the
output is cut back to the noisy tokens. The prompt is encoded together with the resized picture (the
vision-language text encoder); precomputed `prompt_embeds` skip that. Without height / width the call
generates at the picture's resized size."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, call_parameters, device_of
from ..family import Request, class_names
from .qwenimage import QwenImage

# the pipeline resizes the reference picture to this many pixels, on multiples of this many
_AREA, _ROUND = 1024 * 1024, 32
# inputs of other Edit pipelines (inpainting, several pictures) that change what the transformer sees
_VARIANT_INPUTS = ("mask_image", "strength")


def reference_size(image: Any) -> tuple[int, int]:
    """(height, width) the pipeline resizes a PIL picture to: _AREA pixels at its aspect ratio."""
    w, h = image.size
    ratio = w / h
    width = math.sqrt(_AREA * ratio)
    return round(width / ratio / _ROUND) * _ROUND, round(width / _ROUND) * _ROUND


class QwenImageEdit(QwenImage):
    name = "qwenimage-edit"
    label = "QwenImage Edit (QwenImageTransformer2DModel with a processor: QwenImageEditPipeline)"

    def matches(self, components: dict[str, set[str]]) -> bool:
        return super().matches(components) and "processor" in components

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        cls = type(pipe).__name__
        variant = [name for name in _VARIANT_INPUTS if name in call_parameters(pipe)]
        if "QwenImageEditPlusPipeline" in class_names(pipe) or variant:
            raise OptimalStepsError(f"{cls} is not reproduced yet; of the QwenImage Edit pipelines, "
                                    "QwenImageEditPipeline is supported")
        if options.image is None:
            raise OptimalStepsError(f"{cls} needs image= (the picture to edit)")
        if not isinstance(getattr(options.image, "size", None), tuple):
            raise OptimalStepsError(f"{cls} takes image= as a PIL image, got {type(options.image).__name__}")

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        if options.image is None or (height is not None and width is not None):
            return height, width
        ref_h, ref_w = reference_size(options.image)
        multiple = self.vae_scale_factor(pipe) * 2
        return (ref_h // multiple * multiple if height is None else height,
                ref_w // multiple * multiple if width is None else width)

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
