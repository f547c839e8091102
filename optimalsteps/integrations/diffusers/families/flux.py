"""Flux.1 (FluxPipeline and the pipelines built on its transformer): packed latents [B, seq, 4C], distilled
guidance as an embedding, optional true CFG (`true_cfg_scale` > 1 with a negative prompt) as a second call.
Flux Kontext: the reference image's packed latents follow the noisy ones in the sequence (position ids
with first coordinate 1), the output is cut back to the noisy tokens, and the call's size is fitted to
`max_area`.
The other variants (Img2Img, Inpaint, Fill, Control, ControlNet) are recognised by their call's inputs and
components; see their classes."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_default, call_parameters, device_of,
                      guidance_embedding, lora_scale, sequence_length)
from ..family import Family, Request
from ..img2img import ImageToImage, Inpainting, KeepUnmasked, noises_an_image, pixels
from ..prompts import has_negative, negatives

# inputs of the Flux variants that change what the transformer sees: a pipeline taking them is one of the
# variants below, or refused
_VARIANT_INPUTS = ("mask_image", "control_image", "strength")
_VARIANTS = "FluxImg2Img, FluxInpaint, FluxKontextInpaint, FluxFill, FluxControl and FluxControlNet pipelines"


@dataclass(frozen=True)
class ControlNetCall:
    """A Flux ControlNet as the pipeline calls it each step: on the noisy latents and the positive prompt (the
    negative branch of true CFG reuses the positive residuals), its residuals weighted by `scale`."""

    net: Any
    scale: float
    embedded_guidance: Optional[float]
    blocks_repeat: bool  # XLabs ControlNets (with an input hint block) cycle their residuals over the blocks

    def __call__(self, h: torch.Tensor, timestep: torch.Tensor, cond: dict, txt_ids: torch.Tensor,
                 img_ids: torch.Tensor, attention: Optional[dict]) -> dict[str, Any]:
        guidance = guidance_embedding(self.embedded_guidance, h.shape[0], h.device)
        blocks, singles = self.net(hidden_states=h, controlnet_cond=cond["control_latents"], controlnet_mode=None,
                                   conditioning_scale=self.scale, timestep=timestep, guidance=guidance,
                                   pooled_projections=cond["control_pooled_prompt_embeds"],
                                   encoder_hidden_states=cond["control_prompt_embeds"], txt_ids=txt_ids,
                                   img_ids=img_ids, joint_attention_kwargs=attention, return_dict=False)
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": self.blocks_repeat}


class FluxModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], embedded_guidance: Optional[float], img_ids: torch.Tensor,
                 controlnet: Optional[ControlNetCall] = None):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.embedded_guidance, self.img_ids, self.controlnet = embedded_guidance, img_ids, controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # the pipeline casts the timestep to the latents' dtype, then hands the transformer timestep / 1000
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        guidance = guidance_embedding(self.embedded_guidance, x.shape[0], x.device)
        embeds, h = cond["prompt_embeds"], x.to(self.dtype)
        if "image_latents" in cond:  # Kontext: the reference image's tokens after the noisy ones
            h = torch.cat([h, cond["image_latents"].to(self.dtype)], dim=1)
        if "channel_latents" in cond:  # Fill (masked image and mask), Control (control image): more channels
            h = torch.cat([h, cond["channel_latents"].to(self.dtype)], dim=2)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)  # as encode_prompt
        residuals = {} if self.controlnet is None else self.controlnet(x.to(self.dtype), timestep, cond, txt_ids,
                                                                        self.img_ids, self.attention)
        out = self.net(hidden_states=h, timestep=timestep, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=self.img_ids, joint_attention_kwargs=self.attention,
                       return_dict=False, **residuals)[0]
        return out[:, : x.shape[1]]


class FluxInpaintModel(KeepUnmasked, FluxModel):
    """Flux Inpaint's model: the unmasked latents stay on the image's noising line (see `img2img`)."""


class Flux(Family):
    name = "flux"
    label = ("Flux.1 (FluxTransformer2DModel: FluxPipeline, FluxKontextPipeline, FluxImg2ImgPipeline, "
             "FluxInpaintPipeline, FluxKontextInpaintPipeline, FluxFillPipeline, FluxControlPipeline, "
             "FluxControlNetPipeline)")
    denoisers = ("FluxTransformer2DModel",)
    pooled = True
    model_class: ClassVar[type[FluxModel]] = FluxModel

    def variant(self, pipe: Any) -> Family:
        for variant in (FluxControlNet, FluxKontextInpaint, FluxFill, FluxInpaint, FluxControl, FluxImg2Img):
            if variant.fits(pipe):
                return variant()
        return self

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is not None and not _kontext(pipe):
            raise OptimalStepsError(f"image inputs of {type(pipe).__name__} are not supported (Flux Kontext's are)")
        variant = [name for name in _VARIANT_INPUTS if name in _required(pipe)]
        if variant:
            raise OptimalStepsError(f"{type(pipe).__name__} (with {', '.join(variant)}) is not reproduced yet; of the "
                                    f"Flux variants, the {_VARIANTS} are")

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        if "max_area" not in call_parameters(pipe):
            return height, width
        area = options.max_area if options.max_area is not None else call_default(pipe, "max_area")
        # the pipeline keeps the aspect ratio at `area` pixels, on multiples of the packed latent patch
        ratio, multiple = width / height, pipe.vae_scale_factor * 2
        return (round((area / ratio) ** 0.5) // multiple * multiple,
                round((area * ratio) ** 0.5) // multiple * multiple)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, options = request.conditioning, request.options
        common = dict(prompt_2=None, device=device_of(pipe), num_images_per_prompt=request.per_prompt,
                      max_sequence_length=sequence_length(pipe, options), lora_scale=lora_scale(options))
        embeds, pooled, _ = pipe.encode_prompt(prompt=c.texts, prompt_embeds=c.embeds.get("prompt_embeds"),
                                               pooled_prompt_embeds=c.embeds.get("pooled_prompt_embeds"), **common)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if _true_cfg(options) > CFG_THRESHOLD and has_negative(c, options.negative_prompt):
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=negatives(options.negative_prompt, c.count),
                prompt_embeds=c.embeds.get("negative_prompt_embeds"),
                pooled_prompt_embeds=c.embeds.get("negative_pooled_prompt_embeds"), **common)
            cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        if options.image is not None and _kontext(pipe):
            cond["image_latents"], request.extras["image_ids"] = _kontext_latents(pipe, request, embeds)
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        shape, img_ids = packed_latents(pipe, request, cond["prompt_embeds"].dtype)
        if "image_ids" in request.extras:  # Kontext: the reference tokens' ids after the noisy ones'
            img_ids = torch.cat([img_ids, request.extras["image_ids"]], dim=0)
        embedded = request.scale if pipe.transformer.config.guidance_embeds else None
        return self.flow_model(self.model_class, pipe, request, cond, Guidance(_true_cfg(request.options)), shape,
                               embedded, img_ids, self.controlnet(pipe, request))

    def controlnet(self, pipe: Any, request: Request) -> Optional[ControlNetCall]:
        return None

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        channels = latent_channels(pipe)
        if not _kontext(pipe):
            return pipe.prepare_latents(inputs.batch, channels, inputs.height, inputs.width, inputs.dtype,
                                        device_of(pipe), generator)[0]
        return pipe.prepare_latents(None, inputs.batch, channels, inputs.height, inputs.width, inputs.dtype,
                                    device_of(pipe), generator)[0]


class FluxImg2Img(ImageToImage, Flux):
    """FluxImg2ImgPipeline: img2img (see `img2img`); its image is pixels the VAE encodes, or latents."""

    label = "Flux.1 Img2Img (FluxImg2ImgPipeline: image and strength)"

    @staticmethod
    def fits(pipe: Any) -> bool:
        return _img2img(pipe)

    def latent_size(self, pipe: Any, inputs: Any) -> tuple[int, int, int]:
        return (latent_channels(pipe),) + super().latent_size(pipe, inputs)[1:]

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return _image_latents(pipe, image, inputs, generator)


class FluxInpaint(Inpainting, FluxImg2Img):
    """FluxInpaintPipeline: inpainting (see `img2img`). Image and mask are pixels (the pipeline masks the pixel
    image), so it needs its VAE; the image's sampled latents are drawn with the noise, per seed."""

    label = "Flux.1 Inpaint (FluxInpaintPipeline: image, mask_image, strength)"
    model_class = FluxInpaintModel

    @staticmethod
    def fits(pipe: Any) -> bool:
        net = pipe.transformer.config
        return _masked(pipe) and (net.out_channels or net.in_channels) == net.in_channels


class FluxKontextInpaint(FluxInpaint):
    """FluxKontextInpaintPipeline without `image_reference`: inpainting (see `img2img`) at the preferred Kontext
    resolution nearest the image's aspect ratio (whatever height / width say); the image's VAE sample (from the
    seed) is both the image the unmasked region keeps and the reference tokens after the noisy ones (position ids
    with first coordinate 1)."""

    label = "Flux.1 Kontext Inpaint (FluxKontextInpaintPipeline: image, mask_image, strength)"

    @staticmethod
    def fits(pipe: Any) -> bool:
        return _kontext_inpaint(pipe)

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        return _kontext_size(pipe, options.image)

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        own = _kontext_size(pipe, options.image)
        if (height or own[0], width or own[1]) != own:
            # the pipeline generates at the image's Kontext resolution whatever the call says
            raise OptimalStepsError(f"{type(pipe).__name__} runs at its image's Kontext resolution {own[0]}x{own[1]}, "
                                    f"not {height}x{width}")
        return own

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        _, ids = packed_latents(pipe, request, cond["prompt_embeds"].dtype)
        request.extras["image_ids"] = ids.clone().index_fill_(1, torch.tensor([0], device=ids.device), 1)
        return cond

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        latents = super().start(pipe, inputs, generator, sigma_start)
        inputs.cond["image_latents"] = inputs.cond["inpaint_image"]  # the reference tokens: the same sample
        return latents


class FluxFill(FluxInpaint):
    """FluxFillPipeline: the transformer sees the masked image's latents and the mask (packed per latent pixel)
    after the noisy channels; `strength` (default 1) as img2img. The masked image's latents are sampled by the
    VAE after the noise is drawn, so they too are drawn per seed."""

    label = "Flux.1 Fill (FluxFillPipeline: image, mask_image on the channels)"
    model_class = FluxModel

    @staticmethod
    def fits(pipe: Any) -> bool:
        net = pipe.transformer.config
        return _masked(pipe) and (net.out_channels or net.in_channels) < net.in_channels

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        latents = self.noised(pipe, inputs, generator, sigma_start)[0]
        pixels = pipe.image_processor.preprocess(inputs.extras["image"], height=inputs.height,
                                                 width=inputs.width).to(torch.float32)
        mask = pipe.mask_processor.preprocess(inputs.extras["mask_image"], height=inputs.height, width=inputs.width)
        masked = (pixels * (1 - mask)).to(device=device_of(pipe), dtype=inputs.dtype)
        with torch.no_grad():
            mask, masked = pipe.prepare_mask_latents(mask, masked, inputs.batch, latent_channels(pipe), 1,
                                                     inputs.height, inputs.width, inputs.dtype, device_of(pipe),
                                                     generator)
        inputs.cond["channel_latents"] = torch.cat([masked, mask], dim=-1)
        return latents


class FluxControl(Flux):
    """FluxControlPipeline: the control image's VAE latents (sampled before the noise is drawn) follow the noisy
    channels."""

    label = "Flux.1 Control (FluxControlPipeline: control_image on the channels)"

    @staticmethod
    def fits(pipe: Any) -> bool:
        params = call_parameters(pipe)
        return "control_image" in params and not {"mask_image", "strength"} & set(params) and not _controlnet(pipe)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        _check_control(pipe, options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        request.extras.update(control_image=request.options.control_image, per_prompt=request.per_prompt)
        return super().encode(pipe, request)

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        inputs.cond["channel_latents"] = _control_latents(pipe, inputs, generator)
        return super().start(pipe, inputs, generator, sigma_start)


class FluxControlNet(FluxControl):
    """FluxControlNetPipeline with one FluxControlNetModel: called each step on the noisy latents, the positive
    prompt and the control image (its VAE latents, sampled before the noise; XLabs ControlNets take the pixels),
    its residuals weighted by `controlnet_conditioning_scale` enter the transformer's blocks. The call's
    control_guidance_start / end (which switch it per step index, not per noise level) stay at 0 and 1."""

    label = "Flux.1 ControlNet (FluxControlNetPipeline: control_image, controlnet_conditioning_scale)"

    @staticmethod
    def fits(pipe: Any) -> bool:
        return _controlnet(pipe) and not {"mask_image", "strength"} & set(call_parameters(pipe))

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if type(pipe.controlnet).__name__ != "FluxControlNetModel":
            raise OptimalStepsError(f"{type(pipe).__name__} with a {type(pipe.controlnet).__name__} is not reproduced "
                                    "yet; one FluxControlNetModel is")
        _check_control(pipe, options)
        scale = options.controlnet_conditioning_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise OptimalStepsError(f"controlnet_conditioning_scale must be a number, got {scale!r}")

    def call_size(self, pipe: Any, height: int, width: int, options: CallOptions) -> tuple[int, int]:
        image = options.control_image
        if isinstance(image, torch.Tensor) and tuple(image.shape[-2:]) != (height, width):
            # the pipeline would generate at the tensor's size instead of the call's
            raise OptimalStepsError(f"a control_image tensor must have the call's size {height}x{width}, got "
                                    f"{tuple(image.shape[-2:])}")
        return height, width

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        # shared by both branches of true CFG: the pipeline runs the ControlNet on the positive prompt only
        cond.update(control_prompt_embeds=cond["prompt_embeds"],
                    control_pooled_prompt_embeds=cond["pooled_prompt_embeds"])
        return cond

    def controlnet(self, pipe: Any, request: Request) -> Optional[ControlNetCall]:
        net = pipe.controlnet
        scale = request.options.controlnet_conditioning_scale
        scale = float(call_default(pipe, "controlnet_conditioning_scale") if scale is None else scale)
        return ControlNetCall(net, scale, request.scale if net.config.guidance_embeds else None,
                              net.input_hint_block is not None)

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        inputs.cond["control_latents"] = _control_latents(pipe, inputs, generator, pipe.controlnet.input_hint_block
                                                          is None)
        return Flux.start(self, pipe, inputs, generator, sigma_start)


def _image_latents(pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
    """The img2img image's unpacked latents as the pipeline makes them: a tensor with the VAE's latent channels
    as is, anything else preprocessed and encoded by the VAE (drawing from `generator` first, as it does)."""
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.latent_channels:
        return image
    if getattr(pipe, "vae", None) is None:
        raise OptimalStepsError(f"encoding an img2img image needs the pipeline's VAE; pass latents "
                                f"[B, {pipe.latent_channels}, h, w] instead")
    with torch.no_grad():
        return pipe._encode_vae_image(image=pixels(pipe, image, inputs), generator=generator)


def packed_latents(pipe: Any, request: Request, dtype: torch.dtype) -> tuple[tuple[int, int], torch.Tensor]:
    """([tokens, channels] of the packed latents at the request's size, their position ids) as the Flux
    pipelines build them."""
    vsf = pipe.vae_scale_factor
    h, w = request.height // (vsf * 2), request.width // (vsf * 2)
    ids = pipe._prepare_latent_image_ids
    batch = (1,) if "batch_size" in inspect.signature(ids).parameters else ()  # Chroma Img2Img's takes none
    img_ids = ids(*batch, h, w, device_of(pipe), dtype)
    return (h * w, 4 * latent_channels(pipe)), img_ids


def latent_channels(pipe: Any) -> int:
    """Channels of the unpacked noisy latents: what the transformer predicts (Fill and Control take more in)."""
    net = pipe.transformer.config
    return (net.out_channels or net.in_channels) // 4


def _kontext_inpaint(pipe: Any) -> bool:
    params = set(call_parameters(pipe))
    return {"mask_image", "strength", "image_reference"} <= params and "control_image" not in params \
        and not _controlnet(pipe) and noises_an_image(pipe)


def _masked(pipe: Any) -> bool:
    """An inpainting pipeline (mask and strength) with no control input or Kontext reference."""
    params = set(call_parameters(pipe))
    return {"mask_image", "strength"} <= params and not {"control_image", "image_reference"} & params \
        and not _controlnet(pipe)


def _controlnet(pipe: Any) -> bool:
    return "controlnet" in getattr(pipe, "components", {})


def _check_control(pipe: Any, options: CallOptions) -> None:
    cls = type(pipe).__name__
    if options.control_image is None:
        raise OptimalStepsError(f"{cls} needs control_image=")
    if getattr(pipe, "vae", None) is None:
        raise OptimalStepsError(f"{cls} needs its VAE to encode the control image")


def _control_latents(pipe: Any, inputs: Any, generator: Any, encode: bool = True) -> torch.Tensor:
    """The control image as the Control / ControlNet pipelines prepare it: repeated to the batch, then (unless
    `encode` is False) sampled by the VAE from `generator`, normalised and packed."""
    image = pipe.prepare_image(image=inputs.extras["control_image"], width=inputs.width, height=inputs.height,
                               batch_size=inputs.batch, num_images_per_prompt=inputs.extras["per_prompt"],
                               device=device_of(pipe), dtype=pipe.vae.dtype)
    if not encode:
        return image
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.sample(generator=generator)
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return pipe._pack_latents(latents, inputs.batch, latent_channels(pipe), *latents.shape[2:])


def _img2img(pipe: Any) -> bool:
    """A plain img2img pipeline: prepare_latents noises an image to a timestep, and no mask or control input."""
    return noises_an_image(pipe) and not {"mask_image", "control_image"} & set(call_parameters(pipe))


def _kontext(pipe: Any) -> bool:
    """A Kontext-style pipeline: its prepare_latents takes the reference image first."""
    first_two = tuple(inspect.signature(pipe.prepare_latents).parameters)[:2]
    return first_two[:1] == ("image",) and first_two != ("image", "timestep")  # img2img noises its image instead


def _kontext_latents(pipe: Any, request: Request, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed reference latents [B, S, C], their position ids) as the Kontext pipeline builds them: a tensor
    with the VAE's latent channels is taken as latents, anything else is resized to the preferred Kontext
    resolution nearest its aspect ratio and encoded by the VAE."""
    image = request.options.image
    if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.latent_channels):
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError("encoding a Kontext image needs the pipeline's VAE; pass latents "
                                    f"[B, {pipe.latent_channels}, h, w] instead")
        image = _kontext_pixels(pipe, image)
    batch = request.conditioning.count * request.per_prompt
    _, latents, _, ids = pipe.prepare_latents(image, batch, pipe.transformer.config.in_channels // 4, request.height,
                                              request.width, embeds.dtype, device_of(pipe),
                                              torch.Generator(device="cpu").manual_seed(0))
    return latents, ids


def _kontext_size(pipe: Any, image: Any) -> tuple[int, int]:
    """(height, width) a Kontext pipeline resizes an image to: the preferred resolution nearest its aspect ratio."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    first = image[0] if isinstance(image, list) else image
    h, w = pipe.image_processor.get_default_height_width(first)
    _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    return h // multiple * multiple, w // multiple * multiple


def _kontext_pixels(pipe: Any, image: Any) -> torch.Tensor:
    h, w = _kontext_size(pipe, image)
    return pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)


def _true_cfg(options: CallOptions) -> float:
    return 1.0 if options.true_cfg_scale is None else float(options.true_cfg_scale)  # FluxPipeline's default


def _required(pipe: Any) -> set[str]:
    return {name for name in call_parameters(pipe) if name in _VARIANT_INPUTS}
