"""Wan 2.1 / 2.2: video latents [B, C, F, H, W], CFG as two calls; Wan 2.2's second expert (`transformer_2`)
takes the steps below the pipeline's boundary timestep (boundary_ratio x 1000). Text-to-video, image-to-video
(first frame, optionally the last; Wan 2.2 TI2V's clean first-frame tokens) and VACE (a control video, mask and
reference pictures through the VACE blocks). Their `__call__` takes no schedule: schedules run through the
library's own loop (`sample_pipeline`)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import (CallOptions, Guidance, PipelineModel, device_of, flow_timestep, rows, sequence_length,
                      split_conditions)
from ..family import Family, Request
from ..prompts import check_unconditional, negatives


class WanModel(PipelineModel):
    def __init__(self, net: Any, guidance: Guidance, sample_shape: tuple[int, ...], spec: str, num_train_timesteps: int,
                 attention: Optional[dict], net_2: Any, guidance_2: Guidance, boundary: Optional[float],
                 expand_timesteps: bool, frame_mask: Optional[torch.Tensor] = None,
                 control_scale: Optional[torch.Tensor] = None):
        super().__init__(net, guidance, sample_shape, spec, num_train_timesteps, attention)
        self.net_2, self.guidance_2, self.boundary = net_2, guidance_2, boundary
        self.expand_timesteps = expand_timesteps
        # TI2V: [1, 1, F, H, W], 0 on the latents the image condition replaces (the first frame), 1 elsewhere
        self.frame_mask = frame_mask
        self.control_scale = control_scale  # VACE: one scale per VACE block
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

    def token_timesteps(self, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Wan 2.2 (expand_timesteps): one timestep per latent token (patches of 2 x 2 latents per frame), 0 where
        the frame mask keeps a clean condition."""
        mask = self.frame_mask if self.frame_mask is not None else x.new_ones((1, 1) + tuple(x.shape[2:]))
        tokens = mask[0, 0][:, ::2, ::2].flatten().to(device=timestep.device)
        return tokens[None] * timestep[:, None]

    def network_inputs(self, x: torch.Tensor, cond: dict) -> dict[str, Any]:
        """The network's inputs besides the timestep: the latents and the text (families add their conditions)."""
        return {"hidden_states": x, "encoder_hidden_states": cond["prompt_embeds"]}

    def _forward(self, net: Any, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        timestep = self.flow_timestep(t)
        if self.expand_timesteps:
            timestep = self.token_timesteps(timestep, x)
        inputs = self.network_inputs(x, cond)
        hidden = inputs.pop("hidden_states").to(net.dtype)
        return net(hidden_states=hidden, timestep=timestep, attention_kwargs=self.attention, return_dict=False,
                   **inputs)[0]

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

    def extra_frames(self, request: Request) -> int:
        """Latent frames the pipeline generates besides the video's (VACE: one per reference picture)."""
        return 0

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        vsf, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        shape = (self.latent_channels(pipe), (request.frames - 1) // temporal + 1 + self.extra_frames(request),
                 request.height // vsf, request.width // vsf)
        steps = pipe.scheduler.config.num_train_timesteps
        ratio = self.expert_boundary(pipe)
        scale_2 = request.scale if request.options.guidance_scale_2 is None else float(request.options.guidance_scale_2)
        model = self.model_class(pipe.transformer, Guidance(request.scale), shape, request.spec, steps,
                                 request.options.attention_kwargs, getattr(pipe, "transformer_2", None),
                                 Guidance(scale_2), None if ratio is None else ratio * steps,
                                 bool(pipe.config.get("expand_timesteps", False)), **self.model_options(pipe, request))
        return model, torch.float32

    def model_options(self, pipe: Any, request: Request) -> dict[str, Any]:
        """Keyword arguments of the model class that a variant's conditions set (frame mask, control scale)."""
        return {}

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, inputs.model.sample_shape[0], inputs.height, inputs.width,
                                    inputs.num_frames, inputs.dtype, device_of(pipe), generator)


def draw_noise(pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
    """The pipeline's first draw: unit noise of the latents' shape (image-to-video and VACE draw it before, or
    without, any VAE pass, so no VAE runs per draw here)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((inputs.batch,) + tuple(inputs.model.sample_shape), generator=generator,
                        device=device_of(pipe), dtype=torch.float32)


class WanI2VModel(WanModel):
    """Wan image-to-video: the network sees the latents with the image condition (frame mask and VAE latents of
    the first, and last, frame) appended on the channel axis, and Wan 2.1's CLIP image embeddings. Wan 2.2 TI2V
    (expand_timesteps) instead puts the first frame's latents in place of the noisy ones, at timestep 0."""

    def network_inputs(self, x: torch.Tensor, cond: dict) -> dict[str, Any]:
        condition = cond["condition"].to(x.dtype)
        if self.frame_mask is not None:
            mask = self.frame_mask.to(x.dtype)
            hidden = (1 - mask) * condition + mask * x
        else:
            hidden = torch.cat([x, condition], dim=1)
        return {"hidden_states": hidden, "encoder_hidden_states": cond["prompt_embeds"],
                "encoder_hidden_states_image": cond.get("image_embeds")}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        out = super().__call__(x, t, **cond)
        if self.frame_mask is None:
            return out
        # TI2V: the pipeline's latents under the mask are replaced by the condition at every call and at the end.
        # The velocity of the straight path to the condition, (x - c) / t, brings them to exactly the condition at
        # t = 0 under any solver (its data prediction is c), so the final latents are the pipeline's.
        condition = rows(cond["condition"], x.shape[0]).to(out.dtype)
        t = t.to(out.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        to_condition = torch.where(t > 0, (x.to(out.dtype) - condition) / t.clamp_min(1e-12), torch.zeros_like(out))
        return torch.where(self.frame_mask.to(out.device) > 0, out, to_condition)


class WanI2V(Wan):
    model_class = WanI2VModel
    name = "wan-i2v"
    label = "Wan 2.1/2.2 image-to-video and TI2V (WanTransformer3DModel with an image condition)"

    def matches(self, components: dict[str, set[str]]) -> bool:
        nets = components.get("transformer", set()) | components.get("transformer_2", set())
        return bool(nets & set(self.denoisers)) and bool({"image_encoder", "image_processor"} & set(components))

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs image=..., the first frame")
        if pipe.config.get("expand_timesteps") and options.last_image is not None:
            raise OptimalStepsError("last_image is ignored by Wan TI2V (expand_timesteps): it conditions on the first "
                                    "frame only")
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE to encode the first frame")

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        options, batch = request.options, request.conditioning.count * request.per_prompt
        image, last = options.image, options.last_image
        if pipe.transformer is not None and pipe.transformer.config.image_dim is not None:  # Wan 2.1's CLIP tokens
            embeds = pipe.encode_image(image if last is None else [image, last], device_of(pipe))
            cond["image_embeds"] = embeds.repeat(batch, 1, 1).to(self.net(pipe).dtype)

        def pixels(picture: Any) -> Optional[torch.Tensor]:
            if picture is None:
                return None
            return pipe.video_processor.preprocess(picture, height=request.height, width=request.width).to(
                device_of(pipe), dtype=torch.float32)

        # the VAE encodes the frames in its argmax mode: no draw from the generator
        out = pipe.prepare_latents(pixels(image), batch, pipe.vae.config.z_dim, request.height, request.width,
                                   request.frames, torch.float32, device_of(pipe),
                                   torch.Generator(device="cpu").manual_seed(0), None, pixels(last))
        cond["condition"] = out[1]
        if pipe.config.get("expand_timesteps"):
            request.extras["frame_mask"] = out[2]
        return cond

    def model_options(self, pipe: Any, request: Request) -> dict[str, Any]:
        return {"frame_mask": request.extras.get("frame_mask")}

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.vae.config.z_dim)  # the network's input also holds the condition channels

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return draw_noise(pipe, inputs, generator)


class WanVACEModel(WanModel):
    """Wan VACE: the control latents (the control video's inactive and reactive parts, reference pictures' latents
    and the mask) go through the VACE blocks, each scaled by its conditioning scale."""

    def network_inputs(self, x: torch.Tensor, cond: dict) -> dict[str, Any]:
        return {"hidden_states": x, "encoder_hidden_states": cond["prompt_embeds"],
                "control_hidden_states": cond["control"], "control_hidden_states_scale": self.control_scale}


class WanVACE(Wan):
    model_class = WanVACEModel
    name = "wan-vace"
    label = "Wan VACE (WanVACETransformer3DModel)"
    denoisers = ("WanVACETransformer3DModel",)

    def matches(self, components: dict[str, set[str]]) -> bool:
        nets = components.get("transformer", set()) | components.get("transformer_2", set())
        return bool(nets & set(self.denoisers))

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE to encode the control video")
        self.control_scale(pipe, options.conditioning_scale)

    def control_scale(self, pipe: Any, scale: Any) -> torch.Tensor:
        """conditioning_scale as the pipeline hands it to its network: one value per VACE block."""
        net = self.net(pipe)
        blocks = len(net.config.vace_layers)
        scale = 1.0 if scale is None else scale
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = [float(scale)] * blocks
        values = torch.as_tensor(scale, dtype=torch.float32) if isinstance(scale, (list, tuple, torch.Tensor)) else None
        if values is None or values.dim() != 1 or values.shape[0] != blocks:
            raise OptimalStepsError(f"conditioning_scale must be a number or {blocks} numbers (one per VACE block), "
                                    f"got {scale!r}")
        return values.to(device=device_of(pipe), dtype=net.dtype)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        if request.conditioning.count != 1:
            raise OptimalStepsError(f"{type(pipe).__name__} generates one video per call: give one prompt")
        cond = super().encode(pipe, request)
        options, device = request.options, device_of(pipe)
        video, mask, references = pipe.preprocess_conditions(options.video, options.mask, options.reference_images, 1,
                                                             request.height, request.width, request.frames,
                                                             torch.float32, device)
        # the VAE encodes in its argmax mode: no draw from the generator
        latents = pipe.prepare_video_latents(video, mask, references, None, device)
        control = torch.cat([latents, pipe.prepare_masks(mask, references, None)], dim=1)
        cond["control"] = control.to(self.net(pipe).dtype)
        request.extras["reference_frames"] = len(references[0])
        return cond

    def extra_frames(self, request: Request) -> int:
        return int(request.extras["reference_frames"])

    def model_options(self, pipe: Any, request: Request) -> dict[str, Any]:
        return {"control_scale": self.control_scale(pipe, request.options.conditioning_scale)}

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return draw_noise(pipe, inputs, generator)
