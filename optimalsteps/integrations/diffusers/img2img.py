"""Img2img and inpainting as the flow-matching pipelines run them (Flux, QwenImage, Chroma, Z-Image), written once.

Img2img: the loop starts from the image's latents noised to the first sigma s of its run, s noise + (1 - s) image,
and `strength` keeps the last int(N strength) or so of the N sigmas of its (shifted) grid. A schedule for it covers
[s, 0]; `pipeline_kwargs` hands the pipeline those sigmas with strength 1.0, which keeps them all and noises the
image to the first one, so `pipe(...)` runs exactly the schedule `sample_pipeline` runs. The image's VAE latents
are sampled from the call's generator before the noise is drawn, so they are drawn per seed (`start`).

Inpainting: img2img whose steps repaint only where the (binarised) mask is white; after each step the pipeline puts
the rest back on the line s' noise + (1 - s') image at the next sigma s' (the image itself after the last step).
On that line the flow velocity is (x - image) / s, whose x0 prediction is the image itself, so `KeepUnmasked`
predicts it there and the network's guided velocity where the mask repaints: every solver then keeps the unmasked
region on the line, and euler steps give the pipeline's latents (up to float rounding).

A family's variant mixes `ImageToImage` or `Inpainting` in before the family and says how its latents are made
(`encode_image`, `pack`, `latent_size`); everything else is here."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ...core.errors import OptimalStepsError
from ...core.schedules import Schedule
from .common import CallOptions, call_default, call_parameters, device_of, per_sample, rows
from .family import Request


def noises_an_image(pipe: Any) -> bool:
    """An img2img-style pipeline: its prepare_latents noises an image to a timestep."""
    return tuple(inspect.signature(pipe.prepare_latents).parameters)[:2] == ("image", "timestep")


def image_variant(pipe: Any, family: Any, img2img: type, inpaint: type) -> Any:
    """The family's img2img or inpainting variant for a pipeline that noises an image (with no control input or
    reference image), else the family itself."""
    params = set(call_parameters(pipe))
    if noises_an_image(pipe) and not {"control_image", "image_reference"} & params:
        return inpaint() if "mask_image" in params else img2img()
    return family


def refuse_image_pipelines(pipe: Any, family: Any) -> None:
    """Refuse, in one line naming the supported pipelines, another pipeline of the family taking pictures."""
    if {"image", "control_image"} & set(call_parameters(pipe)):
        raise OptimalStepsError(f"{type(pipe).__name__} takes image inputs, which the {family.name} family does not "
                                f"reproduce yet; supported: {family.label}")


def call_strength(pipe: Any, options: CallOptions) -> float:
    """The call's strength (the user's, else the __call__ default), refused in one line unless in (0, 1]."""
    value = options.strength if options.strength is not None else call_default(pipe, "strength")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise OptimalStepsError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


def strength_teacher(grid: Schedule, strength: float) -> Schedule:
    """The part of an N-step grid a call at `strength` runs: from the index the pipelines' get_timesteps starts at."""
    steps = grid.steps
    first = int(max(steps - min(steps * strength, steps), 0))
    if first >= steps:
        raise OptimalStepsError(f"strength {strength} leaves no step of a {steps}-step teacher")
    return Schedule(grid.times[first:], grid.process, grid.solver, {**grid.metadata, "strength": strength})


def noised(image: torch.Tensor, noise: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """s noise + (1 - s) image as the scheduler's scale_noise computes it: its float32 sigma cast to the latents'."""
    sigma = torch.tensor(sigma_start, dtype=torch.float32).to(noise.dtype)
    return sigma * noise + (1.0 - sigma) * image


def repeat_to(value: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`value` repeated along its first axis to `batch` rows, as the pipelines share images / masks among prompts."""
    if batch % value.shape[0]:
        raise OptimalStepsError(f"cannot share {value.shape[0]} {what} among {batch} prompts x images")
    return value.repeat((batch // value.shape[0],) + (1,) * (value.dim() - 1))


class KeepUnmasked:
    """Mixed in before a family's PipelineModel: the inpainting velocity (see the module's docstring)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        velocity = super().__call__(x, t, **cond)
        repaint = rows(cond["inpaint_mask"], x.shape[0]).to(velocity.dtype)
        line = (x - rows(cond["inpaint_image"], x.shape[0])) / per_sample(t, x)
        return repaint * velocity + (1 - repaint) * line.to(velocity.dtype)


class ImageToImage:
    """Mixed in before a family: its img2img pipeline (image and strength)."""

    pixels_only = False  # the image must be pixels (the family passes no latents through)

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        cls = type(pipe).__name__
        if options.image is None:
            raise OptimalStepsError(f"{cls} needs an image (pixels, or latents with {pipe.latent_channels} channels)"
                                    if not self.pixels_only else f"{cls} needs an image")
        if self.pixels_only:
            check_pixels(pipe, options.image)
        call_strength(pipe, options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        request.extras["image"] = request.options.image  # noised into the first latents by `start`
        request.extras["strength"] = call_strength(pipe, request.options)  # recorded with the schedule
        return super().encode(pipe, request)

    def teacher(self, pipe: Any, grid: Schedule, options: CallOptions) -> Schedule:
        return strength_teacher(grid, call_strength(pipe, options))

    def schedule_extras(self, pipe: Any, info: dict, steps: int) -> dict[str, Any]:
        # strength 1.0 keeps every handed sigma; the schedule's first sigma already is the strength's start
        return {**super().schedule_extras(pipe, info, steps), "strength": 1.0}

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return self.start(pipe, inputs, generator, 1.0)

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        return self.noised(pipe, inputs, generator, sigma_start)[0]

    def noised(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the start latents s noise + (1 - s) image, the image's latents), both as the loop holds them (packed
        where the family packs), drawn as the pipeline draws them: the image's VAE latents first, then the noise."""
        from diffusers.utils.torch_utils import randn_tensor

        channels, h, w = self.latent_size(pipe, inputs)
        dtype = self.start_dtype(pipe, inputs)
        image = self.encode_image(pipe, inputs.extras["image"], inputs, generator)
        image = repeat_to(image.to(device=device_of(pipe), dtype=dtype), inputs.batch, "images")
        noise = randn_tensor((inputs.batch, channels, h, w), generator=generator, device=device_of(pipe), dtype=dtype)
        return self.pack(pipe, noised(image, noise, sigma_start), inputs), self.pack(pipe, image, inputs)

    # ------------------------------------------------------------------ what the family says
    def start_dtype(self, pipe: Any, inputs: Any) -> torch.dtype:
        """The dtype the pipeline encodes, noises and blends the image in (Z-Image: its prompt embeddings')."""
        return inputs.dtype

    def latent_size(self, pipe: Any, inputs: Any) -> tuple[int, int, int]:
        """[C, h, w] of the unpacked noisy latents at the call's size (2 x 2 patches: h, w even)."""
        vsf = self.vae_scale_factor(pipe)
        return (self.net(pipe).config.in_channels // (4 if self.packed else 1),
                2 * (inputs.height // (vsf * 2)), 2 * (inputs.width // (vsf * 2)))

    def pack(self, pipe: Any, latents: torch.Tensor, inputs: Any) -> torch.Tensor:
        """Unpacked [B, C, h, w] latents as the loop holds them."""
        if not self.packed:
            return latents
        return pipe._pack_latents(latents, latents.shape[0], *latents.shape[1:])

    def encode_image(self, pipe: Any, image: Any, inputs: Any, generator: Any) -> torch.Tensor:
        """The image's unpacked latents [B, C, h, w] as the pipeline encodes it (sampling from `generator`)."""
        raise NotImplementedError


class Inpainting(ImageToImage):
    """Mixed in before a family: its inpainting pipeline (image, mask_image, strength; white is repainted). The
    family's model class takes `KeepUnmasked` first."""

    pixels_only = True

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        cls = type(pipe).__name__
        if options.image is None or options.mask_image is None:
            raise OptimalStepsError(f"{cls} needs image= and mask_image= (white is repainted)")
        check_pixels(pipe, options.image)
        call_strength(pipe, options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        request.extras["mask_image"] = request.options.mask_image
        return cond

    def start(self, pipe: Any, inputs: Any, generator: Any, sigma_start: float) -> torch.Tensor:
        latents, image = self.noised(pipe, inputs, generator, sigma_start)
        inputs.cond["inpaint_image"] = image  # drawn with the seed: the VAE samples it
        inputs.cond["inpaint_mask"] = self.latent_mask(pipe, inputs, self.start_dtype(pipe, inputs))
        return latents

    def latent_mask(self, pipe: Any, inputs: Any, dtype: torch.dtype) -> torch.Tensor:
        """The mask as the loop blends with it: binarised by the pipeline's mask processor at the call's size,
        resized (nearest) to the latents, one value per latent channel, packed where the family packs."""
        channels, h, w = self.latent_size(pipe, inputs)
        mask = pipe.mask_processor.preprocess(inputs.extras["mask_image"], height=inputs.height, width=inputs.width)
        mask = torch.nn.functional.interpolate(mask, size=(h, w)).to(device=device_of(pipe), dtype=dtype)
        mask = repeat_to(mask, inputs.batch, "masks").repeat(1, channels, 1, 1)
        return self.pack(pipe, mask, inputs)


def check_pixels(pipe: Any, image: Any) -> None:
    """Refuse, in one line, an image the pipeline must encode (or mask in pixels) without a VAE, or given as latents."""
    cls = type(pipe).__name__
    if getattr(pipe, "vae", None) is None:
        raise OptimalStepsError(f"{cls} needs its VAE to encode the image")
    config = pipe.vae.config
    channels = getattr(pipe, "latent_channels", None) or config.get("latent_channels", config.get("z_dim"))
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == channels:
        raise OptimalStepsError(f"{cls} takes image= as pixels, not latents")


def pixels(pipe: Any, image: Any, inputs: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The image preprocessed as the pipelines do it: resized to the call's size, in [-1, 1], float32, then on the
    pipeline's device in `dtype` (default: the latents')."""
    out = pipe.image_processor.preprocess(image, height=inputs.height, width=inputs.width).to(torch.float32)
    return out.to(device=device_of(pipe), dtype=inputs.dtype if dtype is None else dtype)
