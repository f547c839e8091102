"""Tiny randomly initialised pipelines of the supported families, built in code in a second on a CPU with
no downloads: for the tests, the equality benchmark (benchmarks/diffusers_equality.py) and a quick check of
a new diffusers release. Each comes with prompt embeddings (no text encoders) and the call it is run with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class TinyCase:
    name: str
    pipe: Any
    prompts: dict  # the pipeline's own embedding arguments
    call: dict  # height, width, guidance, ... as passed to both pipe(...) and sample_pipeline(...)
    custom_schedule: bool = True  # pipe(...) takes sigmas; otherwise compare on pipeline_schedule
    default_is_teacher: bool = True  # pipe(num_inference_steps=N) runs the teacher grid (linspace under the shift)
    notes: dict = field(default_factory=dict)


def pipeline_latents(pipe: Any, **call: Any) -> torch.Tensor:
    """The latents after the pipeline's last step, as its loop holds them (before unpacking or any VAE)."""
    import inspect

    if "callback_on_step_end" not in inspect.signature(type(pipe).__call__).parameters:
        out = pipe(**call, output_type="latent")
        return out.frames if hasattr(out, "frames") else out.images
    seen = {}

    def keep(_, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return tensors

    try:
        pipe(**call, callback_on_step_end=keep, output_type="latent")
    except AttributeError:  # pipelines that denormalise with their VAE even for latent output; tiny ones have none
        pass
    return seen["latents"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flow_scheduler(**extra: Any) -> Any:
    import diffusers

    return diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=4, max_image_seq_len=64, **extra)


def _with_negative(g: torch.Generator, *shape: int) -> dict:
    """Random prompt embeddings and negative ones of one shape."""
    return {"prompt_embeds": torch.randn(*shape, generator=g),
            "negative_prompt_embeds": torch.randn(*shape, generator=g)}


def _masked(seed: int) -> dict:
    """Two prompts' embeddings [2, 6, 16] with text masks (the second padded by 2 tokens), and negatives."""
    g = _gen(seed)
    return {"prompt_embeds": torch.randn(2, 6, 16, generator=g),
            "prompt_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
            "negative_prompt_embeds": torch.randn(2, 6, 16, generator=g),
            "negative_prompt_attention_mask": torch.ones(2, 6, dtype=torch.long)}


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwenimage() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                axes_dims_rope=(2, 2, 4)).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                       transformer=net)
    g = _gen(3)
    prompts = {"prompt_embeds": torch.randn(2, 5, 16, generator=g),
               "prompt_embeds_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
               "negative_prompt_embeds": torch.randn(2, 4, 16, generator=g),
               "negative_prompt_embeds_mask": torch.ones(2, 4, dtype=torch.long)}
    return TinyCase("QwenImage, mu, true CFG 3 (norm-rescaled), text masks", _quiet(pipe), prompts,
                    dict(height=64, width=64, true_cfg_scale=3.0))


def qwenimage_edit() -> TinyCase:
    """QwenImage Edit with a tiny QwenImage VAE (16x down) for a 4:3 reference picture, which the pipeline
    resizes to 1184x896 (1036 image tokens after the 4 noisy ones)."""
    import diffusers
    from PIL import Image

    base = qwenimage()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
                                           temperal_downsample=[False, True, True, True],
                                           latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    pipe = diffusers.QwenImageEditPipeline(scheduler=base.pipe.scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=base.pipe.transformer)
    pixels = (torch.rand(24, 32, 3, generator=_gen(11)) * 255).to(torch.uint8).numpy()
    return TinyCase("QwenImage Edit, reference picture through the VAE, mu, true CFG 3, text masks", _quiet(pipe),
                    base.prompts, dict(height=64, width=64, true_cfg_scale=3.0, image=Image.fromarray(pixels)))


def flux2_transformer(guidance_embeds: bool) -> Any:
    import diffusers

    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds).eval()


def flux2() -> TinyCase:
    import diffusers

    pipe = diffusers.Flux2Pipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                   transformer=flux2_transformer(True))
    return TinyCase("Flux 2, mu(resolution, steps), distilled guidance 3", _quiet(pipe),
                    {"prompt_embeds": torch.randn(2, 5, 16, generator=_gen(5))}, dict(height=64, width=64,
                                                                                      guidance_scale=3.0))


def flux2_klein() -> TinyCase:
    import diffusers

    pipe = diffusers.Flux2KleinPipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                        transformer=flux2_transformer(False), is_distilled=False)
    prompts = _with_negative(_gen(6), 1, 5, 16)
    return TinyCase("Flux 2 Klein, CFG 3", _quiet(pipe), prompts, dict(height=32, width=32, guidance_scale=3.0))


def chroma() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1).eval()
    pipe = diffusers.ChromaPipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                    transformer=net)
    g = _gen(7)
    prompts = {"prompt_embeds": torch.randn(2, 5, 16, generator=g),
               "prompt_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
               "negative_prompt_embeds": torch.randn(2, 5, 16, generator=g),
               "negative_prompt_attention_mask": torch.ones(2, 5, dtype=torch.bool)}
    return TinyCase("Chroma, mu, CFG 3, text masks", _quiet(pipe), prompts, dict(height=64, width=64,
                                                                                  guidance_scale=3.0))


def zimage() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                             n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                             axes_lens=[64, 32, 32]).eval()
    pipe = diffusers.ZImagePipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                    transformer=net)
    g = _gen(3)
    prompts = {"prompt_embeds": [torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)],
               "negative_prompt_embeds": [torch.randn(4, 16, generator=g), torch.randn(2, 16, generator=g)]}
    return TinyCase("Z-Image, mu, CFG 2 (pos + s (pos - neg)), list embeddings", _quiet(pipe), prompts,
                    dict(height=64, width=64, guidance_scale=2.0))


def auraflow() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                               num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                               joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                               pos_embed_max_size=64).eval()
    pipe = diffusers.AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net,
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.73))
    g = _gen(8)
    prompts = {"prompt_embeds": torch.randn(2, 6, 16, generator=g), "prompt_attention_mask": torch.ones(2, 6),
               "negative_prompt_embeds": torch.randn(2, 6, 16, generator=g),
               "negative_prompt_attention_mask": torch.ones(2, 6)}  # reshaped by the pipeline, unused by its network
    # the tiny transformer's text path is weak: a large scale makes the guidance visible in the latents
    return TinyCase("AuraFlow, shift 1.73, CFG 100", _quiet(pipe), prompts,
                    dict(height=64, width=64, guidance_scale=100.0), default_is_teacher=False)


def lumina2() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                              num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2,
                                              multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
                                              cap_feat_dim=16).eval()
    pipe = diffusers.Lumina2Pipeline(transformer=net, scheduler=flow_scheduler(), vae=None, text_encoder=None,
                                     tokenizer=None)
    return TinyCase("Lumina 2, mu (of the channel count), CFG 4 norm-rescaled, text masks", _quiet(pipe), _masked(10),
                    dict(height=64, width=64, guidance_scale=4.0))


def sana() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                           cross_attention_dim=16, caption_channels=16, sample_size=8).eval()
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net,
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    # without a VAE the pipeline's scale factor is 32: 256 pixels are 8 latents
    return TinyCase("SANA, shift 3, CFG 4.5, text masks", _quiet(pipe), _masked(12),
                    dict(height=256, width=256, guidance_scale=4.5, use_resolution_binning=False, negative_prompt=None),
                    default_is_teacher=False)


def hunyuanvideo15() -> TinyCase:
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                                                spatial_compression_ratio=2, temporal_compression_ratio=2).eval()
    torch.manual_seed(0)
    net = diffusers.HunyuanVideo15Transformer3DModel(  # 4 latent + 4 image-condition + 1 mask channels in
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1,
        text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=32,
        task_type="t2v").eval()
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=net, vae=vae,
                                            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
                                            text_encoder_2=None, tokenizer_2=None,
                                            guider=ClassifierFreeGuidance(guidance_scale=6.0))
    g = _gen(5)
    prompts = {}
    for prefix in ("", "negative_"):
        prompts.update({prefix + "prompt_embeds": torch.randn(1, 6, 16, generator=g),
                        prefix + "prompt_embeds_mask": torch.tensor([[1] * 5 + [0]]),
                        prefix + "prompt_embeds_2": torch.randn(1, 4, 8, generator=g),
                        prefix + "prompt_embeds_mask_2": torch.ones(1, 4, dtype=torch.long)})
    return TinyCase("HunyuanVideo 1.5, shift 5, guider CFG 6, two text encoders", _quiet(pipe), prompts,
                    dict(height=16, width=16, num_frames=5))


def wan_transformer(seed: int, in_channels: int = 4) -> Any:
    import diffusers

    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32).eval()


def flux() -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=16, guidance_embeds=True,
                                           axes_dims_rope=(2, 2, 4)).eval()
    pipe = diffusers.FluxPipeline(scheduler=flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=net)
    g = _gen(7)
    prompts = {"prompt_embeds": torch.randn(2, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(2, 16, generator=g),
               "negative_prompt_embeds": torch.randn(2, 8, 32, generator=g),
               "negative_pooled_prompt_embeds": torch.randn(2, 16, generator=g)}
    return TinyCase("Flux.1, mu, distilled guidance 3.5, true CFG 2", _quiet(pipe), prompts,
                    dict(height=64, width=64, guidance_scale=3.5, true_cfg_scale=2.0))


def flux_kontext() -> TinyCase:
    """Flux Kontext with a reference image given as latents (a 4-channel tiny 'VAE': no VAE is built)."""
    import diffusers

    parts = flux().pipe.components
    pipe = diffusers.FluxKontextPipeline(**{k: parts[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                  "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.latent_channels = 4  # what a VAE with 4 latent channels would set
    g = _gen(9)
    prompts = {"prompt_embeds": torch.randn(2, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(2, 16, generator=g)}
    return TinyCase("Flux Kontext, reference image latents, max_area, mu, distilled guidance 3.5", _quiet(pipe),
                    prompts, dict(height=64, width=64, guidance_scale=3.5, max_area=64 * 64,
                                  image=torch.randn(1, 4, 8, 8, generator=g)))


def flux_img2img() -> TinyCase:
    """Flux Img2Img with its image given as latents (a 4-channel tiny 'VAE': no VAE is built), strength 0.6."""
    import diffusers

    parts = tiny_flux_parts()
    pipe = diffusers.FluxImg2ImgPipeline(**parts)
    pipe.latent_channels = 4  # what a VAE with 4 latent channels would set
    pipe.image_processor.register_to_config(vae_latent_channels=4)  # so that it passes latents through
    g = _gen(11)
    prompts = {"prompt_embeds": torch.randn(2, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(2, 16, generator=g)}
    return TinyCase("Flux Img2Img, image latents, strength 0.6, mu, distilled guidance 3.5", _quiet(pipe), prompts,
                    dict(height=64, width=64, guidance_scale=3.5, strength=0.6,
                         image=torch.randn(1, 4, 8, 8, generator=g)))


def flux_img2img_pixels() -> TinyCase:
    """Flux Img2Img with a pixel image through a tiny VAE (its sampled latents draw from the generator first)."""
    import diffusers

    pipe = diffusers.FluxImg2ImgPipeline(**{**tiny_flux_parts(), "vae": flux_vae()})
    g = _gen(12)
    prompts = {"prompt_embeds": torch.randn(1, 8, 32, generator=g),
               "pooled_prompt_embeds": torch.randn(1, 16, generator=g)}
    return TinyCase("Flux Img2Img, pixel image through a VAE, strength 0.7, mu, distilled guidance 3.5",
                    _quiet(pipe), prompts, dict(height=16, width=16, guidance_scale=3.5, strength=0.7,
                                                image=torch.rand(1, 3, 16, 16, generator=g)))


def tiny_flux_parts() -> dict:
    parts = flux().pipe.components
    return {k: parts[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                  "transformer")}


# ------------------------------------------------ Flux Fill / Inpaint / Control / ControlNet (pixels through a VAE)

def flux_vae() -> Any:
    """A 4-channel AutoencoderKL with two blocks (scale factor 2) and a shift / scale, as Flux's VAE has."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, shift_factor=0.1,
                                   scaling_factor=1.5).eval()


def flux_transformer(in_channels: int = 16, out_channels: Any = None) -> Any:
    import diffusers

    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=out_channels,
                                            num_layers=1, num_single_layers=1, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                            guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def _flux_variant(cls: Any, transformer: Any, **extra: Any) -> Any:
    return _quiet(cls(**{**tiny_flux_parts(), "vae": flux_vae(), "transformer": transformer, **extra}))


def _picture(g: torch.Generator, size: int = 16) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=g)


def _half_mask(size: int = 16) -> torch.Tensor:
    """A [1, 1, size, size] mask repainting the right half."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 2:] = 1.0
    return mask


def flux_inpaint() -> TinyCase:
    """Flux Inpaint: pixel image and mask through a tiny VAE, strength 0.7, true CFG 2."""
    import diffusers

    pipe = _flux_variant(diffusers.FluxInpaintPipeline, flux_transformer())
    prompts = {**flux_embeds(2, 13), **{"negative_" + k: v for k, v in flux_embeds(2, 14).items()}}
    return TinyCase("Flux Inpaint, pixel image + mask through a VAE, strength 0.7, mu, guidance 3.5, true CFG 2",
                    pipe, prompts, dict(height=16, width=16, guidance_scale=3.5, true_cfg_scale=2.0, strength=0.7,
                                        image=_picture(_gen(15)), mask_image=_half_mask()))


def flux_fill() -> TinyCase:
    """Flux Fill: 4 noisy + 4 masked-image + 2 x 2 x 4 mask channels, each packed 2 x 2 (48 in, 16 out)."""
    import diffusers

    pipe = _flux_variant(diffusers.FluxFillPipeline, flux_transformer(48, 16))
    return TinyCase("Flux Fill, masked image + mask on the channels, mu, guidance 30", pipe, flux_embeds(2, 16),
                    dict(height=16, width=16, guidance_scale=30.0, image=_picture(_gen(17)),
                         mask_image=_half_mask()))


def flux_control() -> TinyCase:
    """Flux Control: the control image's latents on the channels (32 in, 16 out)."""
    import diffusers

    pipe = _flux_variant(diffusers.FluxControlPipeline, flux_transformer(32, 16))
    return TinyCase("Flux Control, control image latents on the channels, mu, guidance 3.5", pipe,
                    flux_embeds(2, 18), dict(height=16, width=16, guidance_scale=3.5,
                                             control_image=_picture(_gen(19)) * 2 - 1))


def flux_controlnet() -> TinyCase:
    """Flux ControlNet (InstantX style: control image through the VAE) with random (not zero) residual
    projections, so that its residuals reach the transformer; true CFG 2 reuses the positive residuals."""
    import diffusers

    torch.manual_seed(1)
    controlnet = diffusers.FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                               pooled_projection_dim=16, guidance_embeds=True,
                                               axes_dims_rope=(2, 2, 4)).eval()
    with torch.no_grad():
        for name, weight in controlnet.named_parameters():
            if name.startswith("controlnet_"):  # zero-initialised, as trained ControlNets start
                weight.normal_(0.0, 0.3)
    pipe = _flux_variant(diffusers.FluxControlNetPipeline, flux_transformer(), controlnet=controlnet)
    prompts = {**flux_embeds(2, 20), **{"negative_" + k: v for k, v in flux_embeds(2, 21).items()}}
    return TinyCase("Flux ControlNet, control image through the VAE, scale 0.8, mu, guidance 3.5, true CFG 2", pipe,
                    prompts, dict(height=16, width=16, guidance_scale=3.5, true_cfg_scale=2.0,
                                  control_image=_picture(_gen(22)) * 2 - 1, controlnet_conditioning_scale=0.8))


def flux2_vae() -> Any:
    """A Flux 2 VAE with 4 latent channels (16 after its 2 x 2 patchify) and three blocks (scale factor 4)."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(latent_channels=4, block_out_channels=(8, 8, 8), norm_num_groups=4,
                                       down_block_types=("DownEncoderBlock2D",) * 3,
                                       up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1).eval()
    vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, 16))  # a batch norm that does something
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return vae


def _reference_pictures() -> list:
    """Two PIL pictures at the pipeline's smallest allowed side (64 pixels) and different aspect ratios."""
    from PIL import Image

    g = _gen(23)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for h, w in ((64, 96), (80, 64))]


def flux2_reference() -> TinyCase:
    """Flux 2 with two reference pictures through a tiny VAE: 16 noisy tokens, then 96 + 80 reference ones."""
    import diffusers

    pipe = diffusers.Flux2Pipeline(scheduler=flow_scheduler(), vae=flux2_vae(), text_encoder=None, tokenizer=None,
                                   transformer=flux2_transformer(True))
    return TinyCase("Flux 2, two reference images through the VAE, mu(resolution, steps), distilled guidance 3",
                    _quiet(pipe), {"prompt_embeds": torch.randn(2, 5, 16, generator=_gen(24))},
                    dict(height=32, width=32, guidance_scale=3.0, image=_reference_pictures()))


def flux2_klein_reference() -> TinyCase:
    import diffusers

    pipe = diffusers.Flux2KleinPipeline(scheduler=flow_scheduler(), vae=flux2_vae(), text_encoder=None,
                                        tokenizer=None, transformer=flux2_transformer(False), is_distilled=False)
    return TinyCase("Flux 2 Klein, one reference image through the VAE, CFG 3", _quiet(pipe),
                    _with_negative(_gen(25), 1, 5, 16),
                    dict(height=32, width=32, guidance_scale=3.0, image=_reference_pictures()[0]))


def qwenimage_edit_plus() -> TinyCase:
    """QwenImage Edit Plus with two pictures (4:3, resized to 1184 x 896, and 1:1, to 1024 x 1024): 4 noisy
    tokens, then 1036 and 1024 picture tokens; one prompt per call."""
    import diffusers
    from PIL import Image

    edit = qwenimage_edit()
    pipe = diffusers.QwenImageEditPlusPipeline(**edit.pipe.components)
    square = (torch.rand(20, 20, 3, generator=_gen(26)) * 255).to(torch.uint8).numpy()
    prompts = {k: v[:1] for k, v in edit.prompts.items()}
    return TinyCase("QwenImage Edit Plus, two pictures through the VAE, mu, true CFG 3, text masks", _quiet(pipe),
                    prompts, {**edit.call, "image": [edit.call["image"], Image.fromarray(square)]})


def flux_embeds(batch: int, seed: int) -> dict:
    g = _gen(seed)
    return {"prompt_embeds": torch.randn(batch, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}


def wan21() -> TinyCase:
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=wan_transformer(0),
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    return TinyCase("Wan 2.1, shift 5, CFG 5", _quiet(pipe), _with_negative(_gen(13), 1, 8, 16),
                    dict(height=32, width=32, num_frames=5, guidance_scale=5.0), custom_schedule=False)


def wan_i2v() -> TinyCase:
    """Wan image-to-video (2.2 style: no CLIP image encoder) with a tiny Wan VAE for the first frame."""
    # 4 latent + 2 frame-mask + 4 condition channels in
    return wan_image_case("Wan image-to-video, first frame through the VAE, shift 5, CFG 5", 13, in_channels=10)


def wan22() -> TinyCase:
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=wan_transformer(0),
                                 transformer_2=wan_transformer(1), boundary_ratio=0.875,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    prompts = _with_negative(_gen(13), 1, 8, 16)
    return TinyCase("Wan 2.2 two experts (boundary 0.875), shift 5, CFG 5 / 2", _quiet(pipe), prompts,
                    dict(height=32, width=32, num_frames=5, guidance_scale=5.0, guidance_scale_2=2.0),
                    custom_schedule=False)


CASES: dict[str, Callable[[], TinyCase]] = {
    "flux": flux, "flux-kontext": flux_kontext, "flux-img2img": flux_img2img,
    "flux-img2img-pixels": flux_img2img_pixels, "wan21": wan21, "qwenimage": qwenimage, "flux2": flux2,
    "flux2-klein": flux2_klein, "chroma": chroma, "zimage": zimage, "auraflow": auraflow, "lumina2": lumina2,
    "sana": sana, "hunyuanvideo15": hunyuanvideo15, "wan-i2v": wan_i2v,
    "wan22": wan22,
    "qwenimage-edit": qwenimage_edit,
    "flux-inpaint": flux_inpaint, "flux-fill": flux_fill, "flux-control": flux_control,
    "flux-controlnet": flux_controlnet, "flux2-reference": flux2_reference,
    "flux2-klein-reference": flux2_klein_reference, "qwenimage-edit-plus": qwenimage_edit_plus,
}


# ------------------------------------------------------------------------- CogView4, HiDream (helper cogview)

def cogview4_transformer(in_channels: int = 4) -> Any:
    import diffusers

    torch.manual_seed(0)
    return diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=in_channels, out_channels=4, num_layers=1,
                                                attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
                                                time_embed_dim=8, condition_dim=4, pos_embed_max_size=32,
                                                sample_size=8, rope_axes_dim=(4, 4)).eval()


def cogview4_scheduler() -> Any:
    import diffusers

    # CogView4-6B's own shift settings: mu = sqrt(seq / 256) * 0.75 + 0.25, applied linearly
    return diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear",
                                                     base_image_seq_len=256, base_shift=0.25, max_shift=0.75)


def cogview4() -> TinyCase:
    import diffusers

    pipe = diffusers.CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=cogview4_transformer(),
                                      scheduler=cogview4_scheduler())
    g = _gen(14)
    # the two prompts' embeddings have their own lengths, as the pipeline pads each call to multiples of 16
    prompts = {"prompt_embeds": torch.randn(2, 16, 16, generator=g),
               "negative_prompt_embeds": torch.randn(2, 32, 16, generator=g)}
    return TinyCase("CogView4, linear mu, integer timesteps, CFG 5", _quiet(pipe), prompts,
                    dict(height=64, width=64, guidance_scale=5.0))


def cogview4_control() -> TinyCase:
    """CogView4 Control with a tiny 4-channel VAE (scale factor 2) encoding its control picture."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  scaling_factor=1.5).eval()
    pipe = diffusers.CogView4ControlPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                             transformer=cogview4_transformer(in_channels=8),
                                             scheduler=cogview4_scheduler())
    g = _gen(15)
    prompts = _with_negative(g, 1, 16, 16)
    control = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return TinyCase("CogView4 Control, control picture through the VAE, linear mu, CFG 3.5", _quiet(pipe), prompts,
                    dict(height=32, width=32, guidance_scale=3.5, control_image=control))


CASES.update({"cogview4": cogview4, "cogview4-control": cogview4_control})


def hidream_embeddings(g: torch.Generator, prompts: int) -> dict:
    """HiDream's three embeddings and their negatives: pooled [B, 16], T5 [B, 6, 16], Llama [2 layers, B, 5, 16]."""
    out = {}
    for prefix in ("", "negative_"):
        out.update({prefix + "pooled_prompt_embeds": torch.randn(prompts, 16, generator=g),
                    prefix + "prompt_embeds_t5": torch.randn(prompts, 6, 16, generator=g),
                    prefix + "prompt_embeds_llama3": torch.randn(2, prompts, 5, 16, generator=g)})
    return out


def hidream(scheduler: Any = None) -> TinyCase:
    import diffusers

    torch.manual_seed(0)
    net = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=[0, 1]).eval()
    pipe = diffusers.HiDreamImagePipeline(
        scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        text_encoder_4=None, tokenizer_4=None, transformer=net)
    pipe.default_sample_size = 8  # the call resizes to this area: 64 x 64 pixels, 8 x 8 latents
    return TinyCase("HiDream, shift 3, CFG 5 batched, four embeddings", _quiet(pipe), hidream_embeddings(_gen(16), 2),
                    dict(height=64, width=64, guidance_scale=5.0))


CASES.update({"hidream": hidream})


# ------------------------------------------------------------ video variants: Wan TI2V and VACE, HunyuanVideo
# 1.5 image-to-video, LTX-2


def tiny_wan_vae() -> Any:
    """A Wan VAE with 4 latent channels, 2x down in time and space, and per-channel latent statistics."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                      temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                      latents_std=[1.5, 0.8, 1.0, 2.0], scale_factor_temporal=2,
                                      scale_factor_spatial=2).eval()


def wan_image_case(name: str, seed: int, in_channels: int, **config: Any) -> TinyCase:
    """A WanImageToVideoPipeline with the tiny Wan VAE, no CLIP image encoder and a random first frame."""
    import diffusers

    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                                             transformer=wan_transformer(0, in_channels=in_channels),
                                             image_encoder=None, image_processor=None,
                                             scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0), **config)
    g = _gen(seed)
    prompts = _with_negative(g, 1, 8, 16)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    return TinyCase(name, _quiet(pipe), prompts,
                    dict(height=16, width=16, num_frames=5, guidance_scale=5.0, image=image), custom_schedule=False)


def wan_ti2v() -> TinyCase:
    """Wan 2.2 TI2V (expand_timesteps): the first frame's latents replace the noisy ones, at timestep 0."""
    return wan_image_case("Wan 2.2 TI2V, clean first-frame tokens at timestep 0, shift 5, CFG 5", 14, in_channels=4,
                          expand_timesteps=True)


def wan_flf2v() -> TinyCase:
    """Wan image-to-video from a first and a last frame."""
    case = wan_i2v()
    g = _gen(15)
    case.call["last_image"] = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    case.name = "Wan first and last frame to video, both through the VAE, shift 5, CFG 5"
    return case


def wan_vace() -> TinyCase:
    """Wan VACE with a control video, its mask and a reference picture through a tiny Wan VAE, two VACE blocks."""
    import diffusers
    from PIL import Image

    torch.manual_seed(0)
    net = diffusers.WanVACETransformer3DModel(  # control in: 2 x 4 latent channels + 2 x 2 mask channels
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=12).eval()
    pipe = diffusers.WanVACEPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=net,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    g = _gen(16)

    def picture() -> Any:
        return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy())

    video = [picture() for _ in range(5)]
    mask = [Image.fromarray(((torch.arange(16)[None, :].expand(16, 16) >= 8) * 255).to(torch.uint8).numpy())] * 5
    return TinyCase("Wan VACE, control video + mask + reference picture, conditioning scale 0.7, shift 5, CFG 5",
                    _quiet(pipe), _with_negative(g, 1, 8, 16),
                    dict(height=16, width=16, num_frames=5, guidance_scale=5.0, video=video, mask=mask,
                         reference_images=[picture()], conditioning_scale=0.7), custom_schedule=False)


def hunyuanvideo15_i2v() -> TinyCase:
    """HunyuanVideo 1.5 image-to-video: the text-to-video tiny parts with a tiny SigLIP image encoder (4 tokens)
    and a 4:3 picture, which the pipeline fits to 28 x 36 (height x width; its target size is 32)."""
    import diffusers
    import transformers
    from PIL import Image

    base = hunyuanvideo15()
    parts = {k: v for k, v in base.pipe.components.items()}
    torch.manual_seed(0)
    encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    extractor = transformers.SiglipImageProcessor(size={"height": 16, "width": 16})
    pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(**parts, image_encoder=encoder, feature_extractor=extractor)
    pixels = (torch.rand(24, 32, 3, generator=_gen(17)) * 255).to(torch.uint8).numpy()
    return TinyCase("HunyuanVideo 1.5 image-to-video, first frame through the VAE and SigLIP, shift 5, guider CFG 6",
                    _quiet(pipe), base.prompts, dict(num_frames=5, image=Image.fromarray(pixels)))


def ltx2() -> TinyCase:
    """LTX-2 with tiny video and audio VAEs (8x down in space, 2x in time: the ratios set to what the tiny encoder
    does), text connectors and a one-block transformer: 3 latent frames of 4 x 4 and 5 audio latent frames of 8
    channels x 16 mel bins. The call's STG perturbs block 0 (the default, 28, is past the tiny transformer's one
    block)."""
    import diffusers
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 8), decoder_block_out_channels=(8,), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), down_block_types=("LTX2VideoDownBlock3D",) * 2, upsample_residual=(True,),
        upsample_factor=(2,), spatial_compression_ratio=8, temporal_compression_ratio=2).eval()
    audio_vae = diffusers.AutoencoderKLLTX2Audio(base_channels=4, ch_mult=(1,), num_res_blocks=1, latent_channels=8).eval()
    g = _gen(18)
    vae.latents_mean, vae.latents_std = torch.randn(8, generator=g) * 0.1, torch.rand(8, generator=g) + 0.5
    # the audio statistics are per packed feature (8 channels x 16 mel bins)
    audio_vae.latents_mean, audio_vae.latents_std = torch.randn(128, generator=g) * 0.1, torch.rand(128, generator=g) + 0.5
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32).eval()
    net = diffusers.LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=1, caption_channels=16).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                          base_image_seq_len=4, max_image_seq_len=64)
    pipe = diffusers.LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
                                  connectors=connectors, transformer=net, vocoder=None)
    prompts = {"prompt_embeds": torch.randn(1, 6, 32, generator=g),
               "prompt_attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1]]),  # left padding, as Gemma's
               "negative_prompt_embeds": torch.randn(1, 6, 32, generator=g),
               "negative_prompt_attention_mask": torch.ones(1, 6, dtype=torch.long)}
    return TinyCase("LTX-2, video + audio latents, mu(frames), CFG 3 / 7, STG, modality guidance, rescale 0.7",
                    _quiet(pipe), prompts,
                    dict(height=32, width=32, num_frames=5, spatio_temporal_guidance_blocks=[0]),
                    notes={"latents": ltx2_state})


def ltx2_state(pipe: Any, **call: Any) -> torch.Tensor:
    """An LTX-2 call's final latents as the library's state: video and audio latents packed, normalised, flattened
    and concatenated (the inverse of `families.ltx2.split_latents`)."""
    out = pipe(**call, output_type="latent")
    net, vae, audio_vae = pipe.transformer.config, pipe.vae, pipe.audio_vae
    video = pipe._normalize_latents(out.frames, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    video = pipe._pack_latents(video, net.patch_size, net.patch_size_t)
    audio = pipe._normalize_audio_latents(pipe._pack_audio_latents(out.audio), audio_vae.latents_mean,
                                          audio_vae.latents_std)
    return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


CASES.update({"wan-ti2v": wan_ti2v, "wan-flf2v": wan_flf2v, "wan-vace": wan_vace,
              "hunyuanvideo15-i2v": hunyuanvideo15_i2v, "ltx2": ltx2})


def ltx2_i2v() -> TinyCase:
    """LTX-2 image-to-video on the `ltx2` parts: a 32 x 32 picture as the first frame (image_crf=0: no H.264
    re-compression, which needs PyAV)."""
    import diffusers
    from PIL import Image

    base = ltx2()
    pipe = diffusers.LTX2ImageToVideoPipeline(**base.pipe.components)
    picture = Image.fromarray((torch.rand(32, 32, 3, generator=_gen(19)) * 255).to(torch.uint8).numpy())
    return TinyCase("LTX-2 image-to-video, clean first-frame tokens at timestep 0, video + audio, CFG, STG, modality",
                    _quiet(pipe), base.prompts, dict(base.call, image=picture, image_crf=0), notes=base.notes)


CASES.update({"ltx2-i2v": ltx2_i2v})


# ----------------------------------------- img2img and inpainting of QwenImage, Chroma, Z-Image (pixels through a VAE)

def qwenimage_vae() -> Any:
    """A QwenImage VAE with 4 latent channels and four downsamplings (scale factor 16), its latents normalised."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
                                            temperal_downsample=[False, True, True, True],
                                            latents_mean=[0.1, -0.2, 0.0, 0.3],
                                            latents_std=[1.5, 0.8, 1.0, 2.0]).eval()


def _qwenimage_variant(cls: Any) -> Any:
    base = qwenimage().pipe
    return _quiet(cls(scheduler=base.scheduler, vae=qwenimage_vae(), text_encoder=None, tokenizer=None,
                      transformer=base.transformer))


def qwenimage_img2img() -> TinyCase:
    """QwenImage Img2Img: a 128 x 128 picture through the tiny VAE (8 x 8 latents, 16 tokens), strength 0.7."""
    import diffusers

    return TinyCase("QwenImage Img2Img, pixel image through a VAE, strength 0.7, mu, true CFG 3, text masks",
                    _qwenimage_variant(diffusers.QwenImageImg2ImgPipeline), qwenimage().prompts,
                    dict(height=128, width=128, true_cfg_scale=3.0, strength=0.7, image=_picture(_gen(21), 128)))


def qwenimage_inpaint() -> TinyCase:
    """QwenImage Inpaint: a 128 x 128 picture and a half mask through the tiny VAE, strength 0.8."""
    import diffusers

    return TinyCase("QwenImage Inpaint, pixel image + mask through a VAE, strength 0.8, mu, true CFG 3, text masks",
                    _qwenimage_variant(diffusers.QwenImageInpaintPipeline), qwenimage().prompts,
                    dict(height=128, width=128, true_cfg_scale=3.0, strength=0.8, image=_picture(_gen(22), 128),
                         mask_image=_half_mask(128)))


CASES.update({"qwenimage-img2img": qwenimage_img2img, "qwenimage-inpaint": qwenimage_inpaint})


def _chroma_variant(cls: Any) -> Any:
    parts = chroma().pipe.components
    return _quiet(cls(**{k: parts[k] for k in ("scheduler", "text_encoder", "tokenizer", "transformer")},
                      vae=flux_vae()))


def chroma_img2img() -> TinyCase:
    """Chroma Img2Img: a 16 x 16 picture through the tiny Flux-style VAE (8 x 8 latents, 16 tokens), strength 0.7."""
    import diffusers

    return TinyCase("Chroma Img2Img, pixel image through a VAE, strength 0.7, mu, CFG 3, text masks",
                    _chroma_variant(diffusers.ChromaImg2ImgPipeline), chroma().prompts,
                    dict(height=16, width=16, guidance_scale=3.0, strength=0.7, image=_picture(_gen(23))))


def chroma_inpaint() -> TinyCase:
    """Chroma Inpaint: a 16 x 16 picture and a half mask through the tiny Flux-style VAE, strength 0.8."""
    import diffusers

    pipe = _chroma_variant(diffusers.ChromaInpaintPipeline)
    # diffusers 0.42.1's ChromaInpaintPipeline reads transformer.config.guidance_embeds, which the Chroma
    # transformer's config lacks (it has no guidance embedding: False is what it means)
    pipe.transformer.register_to_config(guidance_embeds=False)
    return TinyCase("Chroma Inpaint, pixel image + mask through a VAE, strength 0.8, mu, CFG 3, text masks",
                    pipe, chroma().prompts,
                    dict(height=16, width=16, guidance_scale=3.0, strength=0.8, image=_picture(_gen(24)),
                         mask_image=_half_mask()))


CASES.update({"chroma-img2img": chroma_img2img, "chroma-inpaint": chroma_inpaint})


def _zimage_variant(cls: Any) -> Any:
    parts = zimage().pipe.components
    return _quiet(cls(**{k: parts[k] for k in ("scheduler", "text_encoder", "tokenizer", "transformer")},
                      vae=flux_vae()))


def zimage_img2img() -> TinyCase:
    """Z-Image Img2Img: a 16 x 16 picture (the call's size) through the tiny Flux-style VAE, strength 0.7."""
    import diffusers

    return TinyCase("Z-Image Img2Img, pixel image through a VAE, strength 0.7, mu, CFG 2, list embeddings",
                    _zimage_variant(diffusers.ZImageImg2ImgPipeline), zimage().prompts,
                    dict(height=16, width=16, guidance_scale=2.0, strength=0.7, image=_picture(_gen(25))))


def zimage_inpaint() -> TinyCase:
    """Z-Image Inpaint: a 16 x 16 picture and a half mask through the tiny Flux-style VAE, strength 0.8."""
    import diffusers

    return TinyCase("Z-Image Inpaint, pixel image + mask through a VAE, strength 0.8, mu, CFG 2, list embeddings",
                    _zimage_variant(diffusers.ZImageInpaintPipeline), zimage().prompts,
                    dict(height=16, width=16, guidance_scale=2.0, strength=0.8, image=_picture(_gen(26)),
                         mask_image=_half_mask()))


CASES.update({"zimage-img2img": zimage_img2img, "zimage-inpaint": zimage_inpaint})


def qwenimage_edit_inpaint() -> TinyCase:
    """QwenImage Edit Inpaint: the Edit case's 4:3 picture (run at its resized 1184 x 896: 1036 noisy tokens, then
    as many reference ones) and a mask repainting its right half, strength 0.8."""
    import diffusers
    from PIL import Image

    edit = qwenimage_edit()
    # the scheduler's own sequence lengths (256 .. 4096 tokens): 1036 tokens shift by e^0.63, not the tiny one's e^12
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = _quiet(diffusers.QwenImageEditInpaintPipeline(**{**edit.pipe.components, "scheduler": scheduler}))
    mask = Image.new("L", edit.call["image"].size, 0)
    mask.paste(255, (mask.size[0] // 2, 0, mask.size[0], mask.size[1]))
    call = {k: v for k, v in edit.call.items() if k not in ("height", "width")}
    return TinyCase("QwenImage Edit Inpaint, picture + mask through a VAE at its resized size, strength 0.8, mu, "
                    "true CFG 3", pipe, edit.prompts, dict(call, strength=0.8, mask_image=mask))


CASES.update({"qwenimage-edit-inpaint": qwenimage_edit_inpaint})


def flux_kontext_inpaint() -> TinyCase:
    """Flux Kontext Inpaint: a square picture, which the pipeline resizes to its 1024 x 1024 Kontext resolution,
    through a 7-block AutoencoderKL (scale factor 64: 16 x 16 latents, 64 noisy then 64 reference tokens), a mask
    repainting its right half, strength 0.8, true CFG 2."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,) * 7,
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 7,
                                  up_block_types=("UpDecoderBlock2D",) * 7, layers_per_block=1, shift_factor=0.1,
                                  scaling_factor=1.5).eval()
    # the scheduler's own sequence lengths (256 .. 4096 tokens), as Kontext's
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = _flux_variant(diffusers.FluxKontextInpaintPipeline, flux_transformer(), vae=vae, scheduler=scheduler)
    prompts = {**flux_embeds(2, 27), **{"negative_" + k: v for k, v in flux_embeds(2, 28).items()}}
    return TinyCase("Flux Kontext Inpaint, picture + mask through a VAE at its Kontext resolution, reference tokens, "
                    "strength 0.8, mu, guidance 3.5, true CFG 2", pipe, prompts,
                    dict(guidance_scale=3.5, true_cfg_scale=2.0, strength=0.8, image=_picture(_gen(29), 128),
                         mask_image=_half_mask(128)))


CASES.update({"flux-kontext-inpaint": flux_kontext_inpaint})
