"""Wan 2.1 / 2.2 text-to-video: video latents [B, C, F, H, W], CFG as two calls; Wan 2.2's second expert
(`transformer_2`) takes the steps below the pipeline's boundary timestep (boundary_ratio x 1000). Its
`__call__` takes no schedule: schedules run through the library's own loop (`sample_pipeline`)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, Guidance, PipelineModel, device_of, flow_timestep, sequence_length, split_conditions
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class WanModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], net_2: Any, guidance_2: Guidance, boundary: Optional[float],
                 expand_timesteps: bool):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.net_2, self.guidance_2, self.boundary = net_2, guidance_2, boundary
        self.expand_timesteps = expand_timesteps
        # which expert evaluates exactly at the boundary: None, the pipeline's own rule (timestep >= boundary:
        # the first); 2 in a searched two-expert schedule, whose step at the boundary starts the second stage
        # (experts.py), while the step landing there ends the first (`end_of_step`)
        self.boundary_owner: Optional[int] = None

    @property
    def end_of_step(self) -> "WanModel":
        """The model of Heun's corrector: a step landing on the boundary runs the high-noise expert to its end."""
        if self.boundary_owner != 2:
            return self
        view = copy.copy(self)
        view.boundary_owner = 1
        return view

    def expert(self, t: torch.Tensor) -> torch.Tensor:
        """1 where the first (high-noise) expert runs at time t, 2 where `transformer_2` does."""
        if self.net_2 is None or self.boundary is None:
            return torch.ones_like(t, dtype=torch.long)
        timestep = self.flow_timestep(t)
        if self.boundary_owner is None:
            return torch.where(timestep >= self.boundary, 1, 2)
        # the boundary's own timestep, truncated as the model's times are (integer timesteps)
        edge = self.flow_timestep(torch.tensor([self.boundary / self.num_train_timesteps], dtype=torch.float64,
                                               device=timestep.device)).to(timestep.dtype)
        high = timestep >= edge if self.boundary_owner == 1 else timestep > edge
        return torch.where(high, 1, 2)

    def _forward(self, net: Any, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = self.flow_timestep(t)
        if self.expand_timesteps:
            # Wan 2.2 TI2V: one timestep per latent token (patches of 2 x 2 pixels per frame)
            tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
            timestep = timestep[:, None].expand(x.shape[0], tokens)
        return net(hidden_states=x.to(net.dtype), timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                   attention_kwargs=self.attention, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        positive, negative = split_conditions(cond, x.shape[0])
        experts = self.expert(t)
        out = None
        # the search mixes times in one batch: each row goes to the expert the pipeline uses at its time
        for which, net, guidance in ((1, self.net, self.guidance), (2, self.net_2, self.guidance_2)):
            idx = (experts == which).nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            pick = (lambda d: {k: v[idx] for k, v in d.items()}) if len(idx) < len(t) else (lambda d: d)
            part = guidance(lambda a, b, c, net=net: self._forward(net, a, b, c), x[idx], t[idx], pick(positive),
                            pick(negative) if negative is not None else None)
            if out is None:
                out = torch.empty(x.shape, dtype=part.dtype, device=part.device)
            out[idx] = part
        return out


class Wan(Family):
    name = "wan"
    label = "Wan 2.1/2.2 text-to-video (WanTransformer3DModel)"
    denoisers = ("WanTransformer3DModel",)
    custom_schedule = False
    video = True
    packed = False
    steps_only = True
    model_class = WanModel

    def matches(self, components: dict[str, set[str]]) -> bool:
        nets = components.get("transformer", set()) | components.get("transformer_2", set())
        # image-to-video (an image encoder / processor) and VACE (its own transformer class) condition the
        # network on more than text: not this family
        return bool(nets & set(self.denoisers)) and not ({"image_encoder", "image_processor"} & set(components))

    def net(self, pipe: Any) -> Any:
        return pipe.transformer if pipe.transformer is not None else pipe.transformer_2

    def vae_scale_factor(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor_spatial", 8))

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": 16}  # what the pipeline's check_inputs demands

    def expert_boundary(self, pipe: Any) -> Optional[float]:
        """The flow sigma (boundary_ratio) where Wan 2.2 hands over to transformer_2; None with one expert."""
        ratio = pipe.config.get("boundary_ratio")
        if ratio is None or getattr(pipe, "transformer_2", None) is None:
            return None
        return float(ratio)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg = request.conditioning, request.kind == "cfg"
        check_unconditional(pipe, c, cfg)
        embeds, neg = pipe.encode_prompt(
            prompt=c.texts, negative_prompt=negatives(request.options.negative_prompt, c.count),
            do_classifier_free_guidance=cfg, num_videos_per_prompt=request.per_prompt,
            prompt_embeds=c.embeds.get("prompt_embeds"), negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
            max_sequence_length=sequence_length(pipe, request.options), device=device_of(pipe))
        dtype = self.net(pipe).dtype
        return {"prompt_embeds": embeds.to(dtype), **({"negative_prompt_embeds": neg.to(dtype)} if cfg else {})}

    def latent_channels(self, pipe: Any) -> int:
        return int(self.net(pipe).config.in_channels)

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        vsf, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        shape = (self.latent_channels(pipe), (request.frames - 1) // temporal + 1, request.height // vsf,
                 request.width // vsf)
        steps = pipe.scheduler.config.num_train_timesteps
        ratio = self.expert_boundary(pipe)
        scale_2 = request.scale if request.options.guidance_scale_2 is None else float(request.options.guidance_scale_2)
        model = self.model_class(pipe.transformer, Guidance(request.scale), shape, request.spec, steps,
                         request.options.attention_kwargs, getattr(pipe, "transformer_2", None), Guidance(scale_2),
                         None if ratio is None else ratio * steps,
                         bool(pipe.config.get("expand_timesteps", False)))
        return model, torch.float32

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, inputs.model.sample_shape[0], inputs.height, inputs.width,
                                    inputs.num_frames, inputs.dtype, device_of(pipe), generator)


class WanI2VModel(WanModel):
    """Wan image-to-video: the network sees the latents with the image condition (frame mask and VAE latents
    of the first frame) appended on the channel axis, and Wan 2.1's CLIP image embeddings."""

    def _forward(self, net: Any, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        h = torch.cat([x, cond["condition"].to(x.dtype)], dim=1).to(net.dtype)
        return net(hidden_states=h, timestep=self.flow_timestep(t), encoder_hidden_states=cond["prompt_embeds"],
                   encoder_hidden_states_image=cond.get("image_embeds"), attention_kwargs=self.attention,
                   return_dict=False)[0]


class WanI2V(Wan):
    model_class = WanI2VModel
    name = "wan-i2v"
    label = "Wan 2.1/2.2 image-to-video (WanTransformer3DModel with an image condition)"

    def matches(self, components: dict[str, set[str]]) -> bool:
        nets = components.get("transformer", set()) | components.get("transformer_2", set())
        return bool(nets & set(self.denoisers)) and bool({"image_encoder", "image_processor"} & set(components))

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs image=..., the first frame")
        if pipe.config.get("expand_timesteps"):
            raise OptimalStepsError("Wan image-to-video with expand_timesteps (TI2V) is not supported yet")
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE to encode the first frame")

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        image, batch = request.options.image, request.conditioning.count * request.per_prompt
        if getattr(pipe, "image_encoder", None) is not None:
            embeds = pipe.encode_image(image, device_of(pipe))
            cond["image_embeds"] = embeds.repeat(batch, 1, 1).to(self.net(pipe).dtype)
        pixels = pipe.video_processor.preprocess(image, height=request.height, width=request.width)
        # the VAE encodes the first frame in its argmax mode: no draw from the generator
        _, cond["condition"] = pipe.prepare_latents(
            pixels.to(device_of(pipe), dtype=torch.float32), batch, pipe.vae.config.z_dim, request.height,
            request.width, request.frames, torch.float32, device_of(pipe), torch.Generator(device="cpu").manual_seed(0))
        return cond

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)  # the network's input also holds the condition channels

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # prepare_latents draws the noise first, then encodes the image (without the generator): the noise
        # alone, without a VAE pass per draw
        return randn_tensor((inputs.batch,) + tuple(inputs.model.sample_shape), generator=generator,
                            device=device_of(pipe), dtype=torch.float32)
