"""LTX-2 text- and image-to-video with audio: video latents (packed [B, S_v, C_v]) and audio latents (packed [B, S_a, C_a])
are denoised together by one transformer, each stepped by its own copy of the same FlowMatchEuler scheduler with
the same sigmas. The model state is the two flattened and concatenated, [B, S_v C_v + S_a C_a]; `split_latents`
gives them back as `pipe(..., output_type="latent")` returns them.

Guidance is LTX-2's own, on x0 = x - sigma v: classifier-free guidance from one batched call ([negative,
positive]), spatio-temporal guidance (a call with the chosen blocks perturbed), modality-isolation guidance (a call
without cross-modal attention), then a rescale to the conditional x0's standard deviation; the audio has its own
scales. mu follows the video's packed sequence length, so the frame count too.

Image-to-video (LTX2ImageToVideoPipeline) starts with the image's latents as the first frame, gives its tokens
timestep 0 and never steps them: their velocity is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ....core.errors import OptimalStepsError
from ....core.schedules import flux_mu
from ..common import CallOptions, PipelineModel, call_default, device_of, sequence_length, split_conditions
from ..family import Family, Request, whole_number
from ..prompts import check_unconditional, negatives

_GUIDANCE = ("guidance_scale", "stg_scale", "modality_scale", "guidance_rescale", "audio_guidance_scale",
             "audio_stg_scale", "audio_modality_scale", "audio_guidance_rescale")


@dataclass(frozen=True)
class LTX2Guidance:
    """The call's guidance settings (its defaults where not given): per modality, the CFG, STG and modality
    scales and the rescale factor."""

    video: tuple[float, float, float, float]  # cfg, stg, modality, rescale
    audio: tuple[float, float, float, float]
    blocks: Optional[list]  # the blocks spatio-temporal guidance perturbs

    @property
    def cfg(self) -> bool:
        return self.video[0] > 1.0 or self.audio[0] > 1.0

    @property
    def stg(self) -> bool:
        return self.video[1] > 0.0 or self.audio[1] > 0.0

    @property
    def modality(self) -> bool:
        return self.video[2] > 1.0 or self.audio[2] > 1.0


@dataclass(frozen=True)
class LTX2Layout:
    """Where the video and audio latents sit in the flat state, and what the network needs to place them."""

    video_tokens: int
    video_features: int
    audio_tokens: int  # latent audio frames
    audio_channels: int
    mel_bins: int  # of the spectrogram; the latents have latent_mel_bins
    latent_mel_bins: int
    frames: int  # latent frames, height, width
    height: int
    width: int
    fps: float  # the frame rate the positions are conditioned on
    cross_timestep: bool  # use_cross_timestep

    @property
    def video_size(self) -> int:
        return self.video_tokens * self.video_features

    @property
    def audio_features(self) -> int:
        return self.audio_channels * self.latent_mel_bins

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        return (x[:, :self.video_size].reshape(n, self.video_tokens, self.video_features),
                x[:, self.video_size:].reshape(n, self.audio_tokens, self.audio_features))


def _guided(x: torch.Tensor, sigma: torch.Tensor, outputs: dict[str, torch.Tensor], scales: tuple) -> torch.Tensor:
    """One modality's guided velocity from its network outputs (cond, and uncond / stg / modality where run), as
    LTX2Pipeline combines them: in x0 = x - sigma v, the deltas added in its order, then the rescale."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg

    cfg, stg, modality, rescale = scales
    x0 = {name: x - out * sigma for name, out in outputs.items()}
    guided = x0["cond"]
    if "uncond" in x0:
        guided = guided + (cfg - 1) * (x0["cond"] - x0["uncond"])
    if "stg" in x0:
        guided = guided + stg * (x0["cond"] - x0["stg"])
    if "modality" in x0:
        guided = guided + (modality - 1) * (x0["cond"] - x0["modality"])
    if rescale > 0:
        guided = rescale_noise_cfg(guided, x0["cond"], guidance_rescale=rescale)
    return (x - guided) / sigma


class LTX2Model(PipelineModel):
    """LTX-2's transformer on the joint state: the guided velocity of the video latents, then of the audio."""

    def __init__(self, net: Any, guidance: LTX2Guidance, sample_shape: tuple[int, ...], spec: str,
                 num_train_timesteps: int, attention: Optional[dict], layout: LTX2Layout, dtype: torch.dtype,
                 clean: Optional[torch.Tensor] = None):
        super().__init__(net, None, sample_shape, spec, num_train_timesteps, attention)
        self.ltx2_guidance, self.layout, self.dtype = guidance, layout, dtype
        self.clean = clean  # image-to-video: [1, video tokens], 1 on the image's (first frame's) tokens

    def _net(self, video: torch.Tensor, audio: torch.Tensor, timestep: torch.Tensor, cond: dict,
             blocks: Optional[list] = None, isolate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        layout, n = self.layout, video.shape[0]
        rope = self.net.rope.prepare_video_coords(n, layout.frames, layout.height, layout.width, video.device,
                                                  fps=layout.fps)
        audio_rope = self.net.audio_rope.prepare_audio_coords(n, layout.audio_tokens, audio.device)
        video_timestep = timestep if self.clean is None else timestep[:, None] * (1 - self.clean)
        v, a = self.net(hidden_states=video.to(self.dtype), audio_hidden_states=audio.to(self.dtype),
                        encoder_hidden_states=cond["prompt_embeds"], audio_encoder_hidden_states=cond["audio_embeds"],
                        timestep=video_timestep, audio_timestep=timestep, sigma=timestep,
                        encoder_attention_mask=cond["prompt_mask"],
                        audio_encoder_attention_mask=cond["prompt_mask"], num_frames=layout.frames,
                        height=layout.height, width=layout.width, fps=layout.fps, audio_num_frames=layout.audio_tokens,
                        video_coords=rope, audio_coords=audio_rope, isolate_modalities=isolate,
                        spatio_temporal_guidance_blocks=blocks, perturbation_mask=None,
                        use_cross_timestep=layout.cross_timestep,
                        attention_kwargs=self.attention, return_dict=False)
        return v.float(), a.float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        positive, negative = split_conditions(cond, x.shape[0])
        video, audio = self.layout.split(x.to(torch.float32))
        timestep = self.flow_timestep(t)
        guide = self.ltx2_guidance
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if negative is not None:
            # one batched call, negative rows first, as the pipeline makes it
            both = {k: torch.cat([negative[k], positive[k]]) for k in positive}
            v, a = self._net(torch.cat([video, video]), torch.cat([audio, audio]), torch.cat([timestep, timestep]),
                             both)
            (v_uncond, v_cond), (a_uncond, a_cond) = v.chunk(2), a.chunk(2)
            outputs["cond"], outputs["uncond"] = (v_cond, a_cond), (v_uncond, a_uncond)
        else:
            outputs["cond"] = self._net(video, audio, timestep, positive)
        if guide.stg:
            outputs["stg"] = self._net(video, audio, timestep, positive, blocks=guide.blocks)
        if guide.modality:
            outputs["modality"] = self._net(video, audio, timestep, positive, isolate=True)
        sigma = t.to(torch.float32).reshape(-1, 1, 1)
        v = _guided(video, sigma, {k: o[0] for k, o in outputs.items()}, guide.video)
        a = _guided(audio, sigma, {k: o[1] for k, o in outputs.items()}, guide.audio)
        if self.clean is not None:  # the pipeline steps only the frames after the image's
            v = torch.where(self.clean[..., None] > 0, torch.zeros_like(v), v)
        return torch.cat([v.flatten(1), a.flatten(1)], dim=1)


def _call_kind(pipe: Any) -> Optional[str]:
    """"t2v" or "i2v" for a pipeline whose __call__ is LTX2Pipeline's or LTX2ImageToVideoPipeline's, else None."""
    import diffusers

    calls = {"t2v": "LTX2Pipeline", "i2v": "LTX2ImageToVideoPipeline"}
    return next((kind for kind, name in calls.items()
                 if type(pipe).__call__ is getattr(getattr(diffusers, name, None), "__call__", None)), None)


class LTX2(Family):
    name = "ltx2"
    label = "LTX-2 text- and image-to-video with audio (LTX2VideoTransformer3DModel)"
    denoisers = ("LTX2VideoTransformer3DModel",)
    video = True
    packed = False

    def variant(self, pipe: Any) -> Family:
        return LTX2I2V() if _call_kind(pipe) == "i2v" else self

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        super().check_options(pipe, options)
        if _call_kind(pipe) != "t2v":
            raise OptimalStepsError(f"{type(pipe).__name__} changes LTX2Pipeline's call (other conditions than a first "
                                    "image), which the ltx2 family does not reproduce yet")
        self.check_settings(options)

    def check_settings(self, options: CallOptions) -> None:
        for name in _GUIDANCE[1:]:
            value = getattr(options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise OptimalStepsError(f"{name} must be a number, got {value!r}")
        for name in ("frame_rate", "motion_speed"):
            value = getattr(options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise OptimalStepsError(f"{name} must be a positive number, got {value!r}")

    # ---------------------------------------------------------------------- sizes
    def vae_scale_factor(self, pipe: Any) -> int:
        return int(pipe.vae_spatial_compression_ratio)

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"multiple": max(32, vae_scale_factor)}  # check_inputs demands multiples of 32

    def num_frames(self, pipe: Any, num_frames: Optional[int]) -> Optional[int]:
        if num_frames is None and getattr(pipe, "duration_head", None) is not None:
            raise OptimalStepsError(f"{type(pipe).__name__} picks the frame count with its duration head: give "
                                    "num_frames")
        frames = 121 if num_frames is None else num_frames  # the call's default without a duration head
        temporal = int(pipe.vae_temporal_compression_ratio)
        if not whole_number(frames) or frames < 1 or (frames - 1) % temporal:
            raise OptimalStepsError(f"num_frames must be 1 more than a multiple of {temporal}, got {frames!r}")
        return int(frames)

    def video_mu(self, pipe: Any, height: int, width: int, steps: Optional[int], frames: Optional[int]) -> float:
        config, net = pipe.scheduler.config, pipe.transformer.config
        frames = self.num_frames(pipe, frames)
        spatial, temporal = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
        tokens = (((frames - 1) // temporal + 1) // net.patch_size_t * (height // spatial // net.patch_size)
                  * (width // spatial // net.patch_size))
        return flux_mu(tokens, config.get("base_image_seq_len", 1024), config.get("max_image_seq_len", 4096),
                       config.get("base_shift", 0.95), config.get("max_shift", 2.05))

    # ------------------------------------------------------------------- guidance, prompts
    def guidance_settings(self, pipe: Any, request: Request) -> LTX2Guidance:
        values = [request.scale] + [getattr(request.options, name) for name in _GUIDANCE[1:]]
        values = [call_default(pipe, name) if value is None else value for name, value in zip(_GUIDANCE, values)]
        if any(value is None for value in values):  # the pipeline itself cannot compare None with its thresholds
            raise OptimalStepsError("LTX-2's audio guidance settings must be numbers, not None")
        blocks = request.options.spatio_temporal_guidance_blocks
        blocks = call_default(pipe, "spatio_temporal_guidance_blocks") if blocks is None else blocks
        return LTX2Guidance(tuple(map(float, values[:4])), tuple(map(float, values[4:])), blocks)

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        audio = call_default(pipe, "audio_guidance_scale") if options.audio_guidance_scale is None else \
            options.audio_guidance_scale
        return "cfg" if scale > 1.0 or (audio is not None and audio > 1.0) else "none"

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        c, cfg, options = request.conditioning, request.kind == "cfg", request.options
        check_unconditional(pipe, c, cfg)
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompt=c.texts, negative_prompt=negatives(options.negative_prompt, c.count), do_classifier_free_guidance=cfg,
            num_videos_per_prompt=request.per_prompt, prompt_embeds=c.embeds.get("prompt_embeds"),
            negative_prompt_embeds=c.embeds.get("negative_prompt_embeds"),
            prompt_attention_mask=c.embeds.get("prompt_attention_mask"),
            negative_prompt_attention_mask=c.embeds.get("negative_prompt_attention_mask"),
            max_sequence_length=sequence_length(pipe, options), device=device_of(pipe))
        request.extras["dtype"] = embeds.dtype
        if cfg:  # the connectors run on [negative, positive] as one batch, as in the pipeline
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        side = getattr(getattr(pipe, "tokenizer", None), "padding_side", "left")
        video, audio, connector_mask = pipe.connectors(embeds, mask, padding_side=side)
        if not cfg:
            return {"prompt_embeds": video, "audio_embeds": audio, "prompt_mask": connector_mask}
        halves = [part.chunk(2) for part in (video, audio, connector_mask)]
        names = ("prompt_embeds", "audio_embeds", "prompt_mask")
        return {**{name: half[1] for name, half in zip(names, halves)},
                **{"negative_" + name: half[0] for name, half in zip(names, halves)}}

    # ------------------------------------------------------------------- model, latents
    def layout(self, pipe: Any, request: Request) -> LTX2Layout:
        from diffusers.pipelines.ltx2.utils import conditioning_frame_rate

        net = pipe.transformer.config
        spatial, temporal = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
        frames, height, width = (request.frames - 1) // temporal + 1, request.height // spatial, request.width // spatial
        options = request.options
        rate = float(call_default(pipe, "frame_rate") if options.frame_rate is None else options.frame_rate)
        speed = float(call_default(pipe, "motion_speed") if options.motion_speed is None else options.motion_speed)
        cross = call_default(pipe, "use_cross_timestep") if options.use_cross_timestep is None else \
            options.use_cross_timestep
        per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
        audio_vae = getattr(pipe, "audio_vae", None)
        mel_bins = audio_vae.config.mel_bins if audio_vae is not None else 64
        channels = audio_vae.config.latent_channels if audio_vae is not None else 8
        tokens = frames // net.patch_size_t * (height // net.patch_size) * (width // net.patch_size)
        return LTX2Layout(tokens, net.in_channels, round(request.frames / rate * per_second), channels, mel_bins,
                          mel_bins // pipe.audio_vae_mel_compression_ratio, frames, height, width,
                          conditioning_frame_rate(rate, speed), bool(cross))

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        layout = self.layout(pipe, request)
        request.extras["layout"] = layout
        shape = (layout.video_size + layout.audio_tokens * layout.audio_features,)
        model = LTX2Model(pipe.transformer, self.guidance_settings(pipe, request), shape, request.spec,
                          pipe.scheduler.config.num_train_timesteps, request.options.attention_kwargs, layout,
                          request.extras["dtype"], self.clean_tokens(pipe, layout))
        return model, torch.float32

    def clean_tokens(self, pipe: Any, layout: LTX2Layout) -> Optional[torch.Tensor]:
        """[1, video tokens]: 1 on the tokens the pipeline keeps clean (image-to-video); None for none."""
        return None

    def draw_video(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        return pipe.prepare_latents(inputs.batch, pipe.transformer.config.in_channels, inputs.height, inputs.width,
                                    inputs.num_frames, 0.0, torch.float32, device_of(pipe), generator)

    def draw(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        """The video latents, then the audio latents, from one generator, as the pipeline draws them."""
        layout = inputs.model.layout
        video = self.draw_video(pipe, inputs, generator)
        audio = pipe.prepare_audio_latents(inputs.batch, layout.audio_channels, layout.audio_tokens, layout.mel_bins,
                                           0.0, torch.float32, device_of(pipe), generator)
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


class LTX2I2V(LTX2):
    name = "ltx2-i2v"
    label = "LTX-2 image-to-video with audio (LTX2VideoTransformer3DModel, LTX2ImageToVideoPipeline's call)"

    def check_options(self, pipe: Any, options: CallOptions) -> None:
        if options.image is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs image=..., the first frame")
        if getattr(pipe, "vae", None) is None:
            raise OptimalStepsError(f"{type(pipe).__name__} needs its VAE to encode the first frame")
        crf = options.image_crf
        if crf is not None and (not whole_number(crf) or crf < 0):
            raise OptimalStepsError(f"image_crf must be a whole number >= 0, got {crf!r}")
        self.check_settings(options)

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        import numpy as np
        from PIL import Image
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf

        cond = super().encode(pipe, request)
        image, crf = request.options.image, request.options.image_crf
        crf = resolve_default_image_crf(getattr(pipe, "text_encoder", None)) if crf is None else crf
        if crf != 0:  # the H.264 re-compression the model was trained with
            if not isinstance(image, Image.Image):
                raise OptimalStepsError("LTX-2 re-compresses its image (image_crf) only from a PIL picture: pass one, "
                                        "or image_crf=0")
            image = Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))
        pixels = pipe.video_processor.preprocess(image, height=request.height, width=request.width)
        request.extras["pixels"] = pixels.to(device=device_of(pipe), dtype=request.extras["dtype"])
        return cond

    def clean_tokens(self, pipe: Any, layout: LTX2Layout) -> Optional[torch.Tensor]:
        net = pipe.transformer.config
        mask = torch.zeros(1, 1, layout.frames, layout.height, layout.width, device=device_of(pipe))
        mask[:, :, 0] = 1.0
        return pipe._pack_latents(mask, net.patch_size, net.patch_size_t).squeeze(-1)

    def draw_video(self, pipe: Any, inputs: Any, generator: Any) -> torch.Tensor:
        """The image's latents on the first frame, noise on the others (the VAE encodes in its argmax mode)."""
        with torch.no_grad():
            return pipe.prepare_latents(inputs.extras["pixels"], inputs.batch, pipe.transformer.config.in_channels,
                                        inputs.height, inputs.width, inputs.num_frames, 0.0, torch.float32,
                                        device_of(pipe), generator)[0]


def split_latents(pipe: Any, latents: torch.Tensor, model: LTX2Model) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [B, C, F, H, W], audio [B, C, L, M]) from an LTX-2 state, unpacked and denormalised as
    `pipe(..., output_type="latent")` returns them (`model`: `pipeline_inputs(...).model` of the call)."""
    layout = model.layout
    video, audio = layout.split(latents)
    net = pipe.transformer.config
    video = pipe._unpack_latents(video, layout.frames, layout.height, layout.width, net.patch_size, net.patch_size_t)
    video = pipe._denormalize_latents(video, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor)
    audio = pipe._denormalize_audio_latents(audio, pipe.audio_vae.latents_mean, pipe.audio_vae.latents_std)
    return video, pipe._unpack_audio_latents(audio, layout.audio_tokens, num_mel_bins=layout.latent_mel_bins)
