"""What the diffusers test modules share: one thread, the error measure, seeded generators and the tiny
pipelines built in code (no downloads). Import after `pytest.importorskip("diffusers")`."""

from __future__ import annotations

from typing import Any, Optional

import diffusers
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy machine OpenMP's waiting makes them 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vae(**config: Any) -> Any:
    """A 4-channel AutoencoderKL with two blocks (scale factor 2); `config` sets scaling_factor, shift_factor."""
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                                   **config).eval()


def tiny_dit(vae: Any, id2label: dict[int, str]) -> Any:
    """A DiT pipeline with learned sigmas on a linear-beta DDIM scheduler."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                                  num_embeds_ada_norm=1000).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(vae: Optional[Any] = None) -> Any:
    """A Flux.1 pipeline with a guidance embedding and a dynamic (mu) shift, without text encoders."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=4, max_image_seq_len=64)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeds(batch: int, seed: int = 7) -> dict:
    g = gen(seed)
    return {"prompt_embeds": torch.randn(batch, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}
