"""Flux.1 (FluxPipeline and the pipelines built on its transformer): packed latents [B, seq, 4C], distilled
guidance as an embedding, optional true CFG (`true_cfg_scale` > 1 with a negative prompt) as a second call.
Flux Kontext: the reference image's packed latents follow the noisy ones in the sequence (position ids
with first coordinate 1), the output is cut back to the noisy tokens, and the call's size is fitted to
`max_area`."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ....core.schedules import Schedule
from ..common import (CFG_THRESHOLD, CallOptions, Guidance, PipelineModel, call_default, call_parameters, device_of,
                      guidance_embedding, lora_scale, sequence_length)
from ..family import Family, Request
from ..prompts import has_negative, negatives

# inputs of the Flux variants that change what the transformer sees; not reproduced yet
_VARIANT_INPUTS = ("mask_image", "control_image", "strength")


class FluxModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], embedded_guidance: Optional[float], img_ids: torch.Tensor):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.embedded_guidance, self.img_ids = embedded_guidance, img_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # the pipeline casts the timestep to the latents' dtype, then hands the transformer timestep / 1000
        timestep = self.flow_timestep(t).to(self.dtype) / 1000
        guidance = guidance_embedding(self.embedded_guidance, x.shape[0], x.device)
        embeds, h = cond["prompt_embeds"], x.to(self.dtype)
        if "image_latents" in cond:  # Kontext: the reference image's tokens after the noisy ones
            h = torch.cat([h, cond["image_latents"].to(self.dtype)], dim=1)
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.img_ids.dtype, device=x.device)  # as encode_prompt
        out = self.net(hidden_states=h, timestep=timestep, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=self.img_ids, joint_attention_kwargs=self.attention,
                       return_dict=False)[0]
        return out[:, : x.shape[1]]


class Flux(Family):
    name = "flux"
    label = "Flux.1 (FluxTransformer2DModel: FluxPipeline, FluxKontextPipeline, FluxImg2ImgPipeline)"
    denoisers = ("FluxTransformer2DModel",)
    pooled = True

    def variant(self, pipe: Any) -> Family:
        return FluxImg2Img() if _img2img(pipe) else self

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return "distilled" if pipe.transformer.config.guidance_embeds else "none"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is not None and not _kontext(pipe):
            raise OptimalStepsError(f"image inputs of {type(pipe).__name__} are not supported (Flux Kontext's are)")
        variant = [name for name in _VARIANT_INPUTS if name in _required(pipe)]
        if variant:
            raise OptimalStepsError(f"{type(pipe).__name__} needs {', '.join(variant)}, which the flux family does "
                                    "not reproduce yet")

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
        if "image_latents" in cond:
            img_ids = torch.cat([img_ids, request.extras["image_ids"]], dim=0)
        embedded = request.scale if pipe.transformer.config.guidance_embeds else None
        return self.flow_model(FluxModel, pipe, request, cond, Guidance(_true_cfg(request.options)), shape,
                               embedded, img_ids)

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        if not _kontext(pipe):
            return super().draw(pipe, inputs, generator)
        return pipe.prepare_latents(None, inputs.batch, pipe.transformer.config.in_channels // 4, inputs.height,
                                    inputs.width, inputs.dtype, device_of(pipe), generator)[0]


class FluxImg2Img(Flux):
    """FluxImg2ImgPipeline: the loop starts from the image's latents noised to the first sigma s of its run,
    s noise + (1 - s) image latents, and `strength` keeps the last int(N strength) or so of its N sigmas.

    A schedule for it covers [s, 0] (its first time is where the image is noised to). `pipeline_kwargs` hands the
    pipeline those sigmas with strength 1.0, which keeps them all and noises the image to the first one, so
    `pipe(...)` runs exactly the schedule `sample_pipeline` runs; the teacher is the pipeline's own N-step run
    at the call's strength: its shifted grid from the index the pipeline's get_timesteps starts at."""

    label = "Flux.1 Img2Img (FluxImg2ImgPipeline: image and strength)"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs an image (pixels, or latents with "
                                    f"{pipe.latent_channels} channels)")
        call_strength(pipe, options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        request.extras["image"] = request.options.image  # noised into the first latents by `start`
        request.extras["strength"] = call_strength(pipe, request.options)  # recorded with the schedule
        return super().encode(pipe, request)

    def teacher(self, pipe: Any, grid: Schedule, options: CallOptions) -> Schedule:
        strength, steps = call_strength(pipe, options), grid.steps
        first = int(max(steps - min(steps * strength, steps), 0))  # as the pipeline's get_timesteps
        if first >= steps:
            raise OptimalStepsError(f"strength {strength} leaves no step of a {steps}-step teacher")
        return Schedule(grid.times[first:], grid.process, grid.solver, {**grid.metadata, "strength": strength})

    def schedule_extras(self, pipe: Any, info: dict, steps: int) -> dict[str, Any]:
        # strength 1.0 keeps every handed sigma; the schedule's first sigma already is the strength's start
        return {**super().schedule_extras(pipe, info, steps), "strength": 1.0}

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return self.start(pipe, inputs, generator, 1.0)

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype, channels = device_of(pipe), inputs.dtype, pipe.transformer.config.in_channels // 4
        h, w = 2 * (inputs.height // (pipe.vae_scale_factor * 2)), 2 * (inputs.width // (pipe.vae_scale_factor * 2))
        image = _image_latents(pipe, inputs.extras["image"], inputs.height, inputs.width, dtype, generator)
        if inputs.batch % image.shape[0]:
            raise OptimalStepsError(f"cannot share {image.shape[0]} images among {inputs.batch} prompts x images")
        image = image.repeat(inputs.batch // image.shape[0], 1, 1, 1)
        noise = randn_tensor((inputs.batch, channels, h, w), generator=generator, device=device, dtype=dtype)
        sigma = torch.tensor(sigma_start, dtype=torch.float32).to(dtype)  # the scheduler's float32 sigma, cast
        return pipe._pack_latents(sigma * noise + (1.0 - sigma) * image, inputs.batch, channels, h, w)


def call_strength(pipe: Any, options: CallOptions) -> float:
    """The call's strength (the user's, else the __call__ default), refused in one line unless in (0, 1]."""
    value = options.strength if options.strength is not None else call_default(pipe, "strength")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise OptimalStepsError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


def _image_latents(pipe: Any, image: Any, height: int, width: int, dtype: torch.dtype, generator: Any) -> torch.Tensor:
    """The img2img image's unpacked latents as the pipeline makes them: a tensor with the VAE's latent channels
    as is, anything else preprocessed and encoded by the VAE (drawing from `generator` first, as it does)."""
    device = device_of(pipe)
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.latent_channels:
        return image.to(device=device, dtype=dtype)
    if getattr(pipe, "vae", None) is None:
        raise OptimalStepsError(f"encoding an img2img image needs the pipeline's VAE; pass latents "
                                f"[B, {pipe.latent_channels}, h, w] instead")
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
    with torch.no_grad():
        return pipe._encode_vae_image(image=pixels.to(device=device, dtype=dtype), generator=generator)


def packed_latents(pipe: Any, request: Request, dtype: torch.dtype) -> tuple[tuple[int, int], torch.Tensor]:
    """([tokens, channels] of the packed latents at the request's size, their position ids) as the Flux
    pipelines build them."""
    vsf = pipe.vae_scale_factor
    h, w = request.height // (vsf * 2), request.width // (vsf * 2)
    img_ids = pipe._prepare_latent_image_ids(1, h, w, device_of(pipe), dtype)
    return (h * w, pipe.transformer.config.in_channels), img_ids


def _img2img(pipe: Any) -> bool:
    """A plain img2img pipeline: prepare_latents noises an image to a timestep, and no mask or control input."""
    first_two = tuple(inspect.signature(pipe.prepare_latents).parameters)[:2]
    return first_two == ("image", "timestep") and not {"mask_image", "control_image"} & set(call_parameters(pipe))


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


def _kontext_pixels(pipe: Any, image: Any) -> torch.Tensor:
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    first = image[0] if isinstance(image, list) else image
    h, w = pipe.image_processor.get_default_height_width(first)
    _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    h, w = h // multiple * multiple, w // multiple * multiple
    return pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)


def _true_cfg(options: CallOptions) -> float:
    return 1.0 if options.true_cfg_scale is None else float(options.true_cfg_scale)  # FluxPipeline's default


def _required(pipe: Any) -> set[str]:
    return {name for name in call_parameters(pipe) if name in _VARIANT_INPUTS}
