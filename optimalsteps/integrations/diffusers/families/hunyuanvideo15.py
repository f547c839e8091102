"""HunyuanVideo 1.5: latents [B, C, F, H, W] with image-condition channels and a mask appended, two text
encoders' embeddings with masks and vision tokens; guidance comes from the pipeline's `guider`
(ClassifierFreeGuidance over the whole run: two calls per step). Text-to-video appends zeros and hands zero
vision tokens; image-to-video appends the picture's VAE latents on the first frame with a mask of 1 there, and
hands its SigLIP tokens."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, Guidance, PipelineModel, device_of
from ..family import Family, Request
from ..prompts import Conditioning, embeddings, text_conditioning

_TEXT = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


class HunyuanVideo15Model(PipelineModel):
    def __init__(self, *args: Any, vision: torch.Tensor, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vision = vision  # [1, tokens, dim] zeros, as the text-to-video pipeline hands them

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n = x.shape[0]
        condition, mask = cond.get("image_condition"), cond.get("image_mask")
        if condition is None:  # text-to-video
            condition, mask = torch.zeros_like(x), x.new_zeros((n, 1) + tuple(x.shape[2:]))
        h = torch.cat([x, condition.to(x.dtype), mask.to(x.dtype)], dim=1).to(self.dtype)
        vision = cond.get("image_embeds", self.vision.expand(n, -1, -1))
        timestep = self.flow_timestep(t).to(self.dtype)
        return self.net(hidden_states=h, image_embeds=vision, timestep=timestep,
                        encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond["prompt_embeds_mask"],
                        encoder_hidden_states_2=cond["prompt_embeds_2"],
                        encoder_attention_mask_2=cond["prompt_embeds_mask_2"], attention_kwargs=self.attention,
                        return_dict=False)[0]


class HunyuanVideo15(Family):
    name = "hunyuanvideo15"
    label = "HunyuanVideo 1.5 text-to-video (HunyuanVideo15Transformer3DModel)"
    denoisers = ("HunyuanVideo15Transformer3DModel",)
    video = True
    packed = False

    def matches(self, components: dict[str, set[str]]) -> bool:
        return super().matches(components) and not ({"image_encoder", "feature_extractor"} & set(components))

    def vae_scale_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor_spatial)

    def latent_shape(self, pipe: Any, request: Request) -> tuple[int, int, int, int]:
        vsf, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        return (pipe.num_channels_latents, (request.frames - 1) // temporal + 1, request.height // vsf,
                request.width // vsf)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        h, w = pipe.video_processor.calculate_default_height_width(pipe.default_aspect_ratio[1],
                                                                    pipe.default_aspect_ratio[0], pipe.target_size)
        return int(h), int(w)

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": vae_scale_factor}

    def default_run(self, pipe: Any, scheduler: Any, steps: int, height: int, width: int) -> None:
        scheduler.set_timesteps(sigmas=[1.0 - k / steps for k in range(steps)])

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        guider = pipe.guider
        config = guider.config
        if (type(guider).__name__ != "ClassifierFreeGuidance" or config.start != 0.0 or config.stop != 1.0
                or config.guidance_rescale or config.use_original_formulation):
            raise OptimalStepsError("HunyuanVideo 1.5 is supported with a plain ClassifierFreeGuidance guider over "
                                    "the whole run (start 0, stop 1, no rescale)")
        return "cfg" if guider._enabled and guider.num_conditions > 1 else "none"

    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        if isinstance(prompts, dict):
            return embeddings(pipe, prompts, options.negative_prompt, False, False)
        return text_conditioning(pipe, prompts, options.negative_prompt, False, False)

    def _encode(self, pipe: Any, request: Request, texts: Any, given: dict) -> dict:
        values = pipe.encode_prompt(prompt=texts, device=device_of(pipe), dtype=pipe.transformer.dtype,
                                    batch_size=request.conditioning.count, num_videos_per_prompt=request.per_prompt,
                                    **given)
        return dict(zip(_TEXT, values))

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, options = request.conditioning, request.options
        cond = self._encode(pipe, request, c.texts, {k: c.embeds.get(k) for k in _TEXT})
        if request.kind == "cfg":
            negative = self._encode(pipe, request, options.negative_prompt if c.texts is None else
                                    (options.negative_prompt or ""), {k: c.embeds.get("negative_" + k) for k in _TEXT})
            cond.update({"negative_" + k: v for k, v in negative.items()})
        return cond

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        shape = self.latent_shape(pipe, request)
        net = pipe.transformer
        vision = torch.zeros(1, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, dtype=net.dtype,
                             device=device_of(pipe))
        scale = float(pipe.guider.guidance_scale) if request.kind == "cfg" else 1.0
        model = HunyuanVideo15Model(net, Guidance(scale), shape, request.spec,
                                    pipe.scheduler.config.num_train_timesteps, request.options.attention_kwargs,
                                    vision=vision)
        return model, net.dtype

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, pipe.num_channels_latents, inputs.height, inputs.width,
                                    inputs.num_frames, inputs.dtype, device_of(pipe), generator)


class HunyuanVideo15I2V(HunyuanVideo15):
    name = "hunyuanvideo15-i2v"
    label = "HunyuanVideo 1.5 image-to-video (HunyuanVideo15Transformer3DModel with an image encoder)"

    def matches(self, components: dict[str, set[str]]) -> bool:
        return bool(components.get(self.denoiser, set()) & set(self.denoisers)) and "image_encoder" in components

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        from PIL import Image

        if not isinstance(options.image, Image.Image):
            raise OptimalStepsError(f"{type(pipe).__name__} needs image=..., the first frame as a PIL picture")
        if pipe.transformer.config.get("use_meanflow"):
            raise OptimalStepsError("HunyuanVideo 1.5 with use_meanflow (the network also sees the next step's "
                                    "timestep) is not supported")
        if getattr(pipe, "vae", None) is None or getattr(pipe, "image_encoder", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE and image encoder for the first frame")

    def default_size(self, pipe: Any) -> tuple[int, int]:
        """The size of a square picture (the call's size follows its picture: `requested_size`)."""
        h, w = pipe.video_processor.calculate_default_height_width(1, 1, pipe.target_size)
        return int(h), int(w)

    def requested_size(self, pipe: Any, height: Optional[int], width: Optional[int],
                       options: CallOptions) -> tuple[Optional[int], Optional[int]]:
        """The pipeline takes no size: it fits the picture's aspect ratio to its target size."""
        if options.image is None:
            return height, width
        size = pipe.video_processor.calculate_default_height_width(options.image.size[1], options.image.size[0],
                                                                   pipe.target_size)
        if (height, width) not in ((None, None), tuple(size)):
            raise OptimalStepsError(f"{type(pipe).__name__} generates at the size it fits to the image, "
                                    f"{size[0]}x{size[1]}, not {height}x{width}")
        return int(size[0]), int(size[1])

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        cond = super().encode(pipe, request)
        batch, dtype, device = request.conditioning.count * request.per_prompt, pipe.transformer.dtype, device_of(pipe)
        image = pipe.video_processor.resize(request.options.image, height=request.height, width=request.width,
                                            resize_mode="crop")
        cond["image_embeds"] = pipe.encode_image(image=image, batch_size=batch, device=device, dtype=dtype)
        shaped = torch.empty((batch,) + self.latent_shape(pipe, request), dtype=dtype, device=device)
        cond["image_condition"], cond["image_mask"] = pipe.prepare_cond_latents_and_mask(
            latents=shaped, image=image, batch_size=batch, height=request.height, width=request.width, dtype=dtype,
            device=device)
        return cond
