"""CogView4 (CogView4Pipeline; CogView4ControlPipeline adds control latents as extra input channels): latents
[B, C, H, W] in float32, CFG as a second call, SDXL-like size conditions, a mu of its own (square root of the
sequence length, shifted linearly by default).

The trap: the network is not given the shifted sigma. The pipeline builds integer timesteps
int(linspace(1000, 1, N)), takes sigmas = timesteps / 1000, shifts only the sigmas, and hands the network
the unshifted integers. As a model of the noise level sigma the network therefore sees
round(1000 * unshift(sigma)), and a custom schedule must be handed as both arrays: the pre-shift `sigmas`
and those integer `timesteps` (with `sigmas` alone the pipeline would pair them with the default linspace
timesteps). The call truncates the timesteps it is given to integers, so rounding here is exact."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ....core.errors import OptimalStepsError
from ....core.processes import FLOW
from ....core.schedules import Schedule
from ..common import (CallOptions, Guidance, PipelineModel, call_parameters, device_of, given_embeddings,
                      sequence_length, with_negatives)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


def unshift(sigma: torch.Tensor, k: float) -> torch.Tensor:
    """The preimage of a flow sigma under the shift k s / (1 + (k - 1) s), in float64."""
    sigma = sigma.to(torch.float64)
    return sigma / (sigma + k * (1.0 - sigma))


def network_timesteps(sigma: torch.Tensor, k: float, num_train_timesteps: int) -> torch.Tensor:
    """The integer timesteps (as float32) CogView4 hands its network at flow sigma `sigma` under shift k."""
    return torch.round(unshift(sigma, k) * num_train_timesteps).to(torch.float32)


class CogView4Model(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], k: float, sizes: torch.Tensor):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.k, self.sizes = k, sizes  # sizes: [3, 2] original size, target size, crop corner

    @property
    def time_dtype(self) -> Optional[torch.dtype]:
        return torch.float64  # the integer a float32 sigma rounds to can differ from the float64 one's

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n = x.shape[0]
        h = x if "control_latents" not in cond else torch.cat([x, cond["control_latents"]], dim=1)
        original, target, crop = (size.expand(n, -1) for size in self.sizes.unbind(0))
        return self.net(hidden_states=h.to(self.net.dtype), encoder_hidden_states=cond["prompt_embeds"],
                        timestep=network_timesteps(t, self.k, self.num_train_timesteps).to(x.device),
                        original_size=original, target_size=target, crop_coords=crop,
                        attention_kwargs=self.attention, return_dict=False)[0].float()


class CogView4(Family):
    name = "cogview4"
    label = "CogView4 (CogView4Transformer2DModel: CogView4Pipeline, CogView4ControlPipeline)"
    denoisers = ("CogView4Transformer2DModel",)
    packed = False

    def variant(self, pipe: Any) -> Family:
        return CogView4Control() if "control_image" in call_parameters(pipe) else self

    def check_scheduler(self, pipe: Any) -> None:
        name = type(pipe.scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise OptimalStepsError(f"CogView4 hands its scheduler sigmas and timesteps together, which only "
                                    f"FlowMatchEulerDiscreteScheduler takes, not {name}")

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = pipe.transformer.config.sample_size * self.vae_scale_factor(pipe)
        return size, size

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        # the pipeline's check_inputs asks for multiples of 16, its transformer for whole patches
        return {"multiple": math.lcm(16, vae_scale_factor * net_config["patch_size"])}

    def image_seq_len(self, pipe: Any, height: int, width: int) -> int:
        vsf = self.vae_scale_factor(pipe)
        return (height // vsf) * (width // vsf) // pipe.transformer.config.patch_size ** 2

    def mu(self, pipe: Any, height: int, width: int, steps: Optional[int]) -> float:
        config = pipe.scheduler.config
        ratio = self.image_seq_len(pipe, height, width) / config.get("base_image_seq_len", 256)
        return math.sqrt(ratio) * config.get("max_shift", 0.75) + config.get("base_shift", 0.25)

    # ------------------------------------------------------------------ its integer timesteps
    def default_timesteps(self, pipe: Any, steps: int) -> np.ndarray:
        """int(linspace(T, 1, steps)) as float32, the timesteps of `pipe(num_inference_steps=steps)`."""
        train = pipe.scheduler.config.num_train_timesteps
        return np.linspace(train, 1.0, steps).astype(np.int64).astype(np.float32)

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        timesteps = self.default_timesteps(pipe, steps)
        mu = self.shift(pipe, height, width, steps)[1].get("mu")
        scheduler.set_timesteps(sigmas=timesteps / scheduler.config.num_train_timesteps, timesteps=timesteps, mu=mu)

    def flow_teacher(self, pipe: Any, steps: int, k: float) -> Schedule:
        train = pipe.scheduler.config.num_train_timesteps
        base = torch.as_tensor(self.default_timesteps(pipe, steps), dtype=torch.float64) / train
        times = torch.cat([k * base / (1.0 + (k - 1.0) * base), torch.zeros(1, dtype=torch.float64)])
        return Schedule(times, FLOW, metadata={"baseline": "pipeline"})

    def schedule_timesteps(self, pipe: Any, unshifted: torch.Tensor) -> dict[str, Any]:
        train = pipe.scheduler.config.num_train_timesteps
        return {"timesteps": torch.round(unshifted * train).long().tolist()}

    # ------------------------------------------------------------------ prompts and model
    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, neg = pipe.encode_prompt(
            c.texts, negatives(options.negative_prompt, c.count), cfg, num_images_per_prompt=request.per_prompt,
            **given_embeddings(c.embeds, "prompt_embeds"), device=device_of(pipe),
            max_sequence_length=sequence_length(pipe, options))
        if cfg and neg.shape[0] not in (1, embeds.shape[0]):
            # its encode_prompt repeats only the negatives it encodes itself; the call then fails on the rows
            raise OptimalStepsError(f"{type(pipe).__name__} does not repeat given negative_prompt_embeds per image: "
                                    f"with images_per_prompt={request.per_prompt} give one prompt at a time")
        return with_negatives(cfg, prompt_embeds=(embeds, neg))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        h, w = request.height, request.width
        sizes = torch.tensor([[h, w], [h, w], [0, 0]], dtype=cond["prompt_embeds"].dtype, device=device_of(pipe))
        k = self.shift(pipe, h, w)[0]
        vsf = self.vae_scale_factor(pipe)
        shape = (self.latent_channels(pipe), h // vsf, w // vsf)
        return self.flow_model(CogView4Model, pipe, request, cond, Guidance(request.scale), shape, k,
                               sizes.unsqueeze(1), latents_dtype=torch.float32)

    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, self.latent_channels(pipe), inputs.height, inputs.width,
                                    torch.float32, device_of(pipe), generator)


class CogView4Control(CogView4):
    """CogView4ControlPipeline: the control image's VAE latents are concatenated to the noisy latents as
    input channels (the transformer takes twice the latent channels). The pipeline encodes the control image
    with a sample of the VAE's posterior drawn from torch's global random state (it hands the VAE no
    generator), so the control latents match only where the global seed matches."""

    label = "CogView4 Control (CogView4ControlPipeline: control_image)"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        if options.control_image is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs control_image= (the condition picture)")

    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 2

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        batch = request.conditioning.count * request.per_prompt
        image = pipe.prepare_image(request.options.control_image, request.width, request.height, batch,
                                   request.per_prompt, device_of(pipe), pipe.vae.dtype)
        if tuple(image.shape[-2:]) != (request.height, request.width):
            # the pipeline would generate at the image's size while conditioning on the call's
            raise OptimalStepsError(f"control_image is {tuple(image.shape[-2:])} pixels, the call "
                                    f"{(request.height, request.width)}: pass height / width of the image")
        cond["control_latents"] = pipe.vae.encode(image).latent_dist.sample() * pipe.vae.config.scaling_factor
        return cond
