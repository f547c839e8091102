"""Pipelines that take reference pictures as extra tokens, on tiny random pipelines built in code (no
downloads): Flux 2 / Flux 2 Klein `image=` and QwenImage Edit Plus (several pictures). The search's teacher is
the pipeline's own run, `pipe(..., **pipeline_kwargs(schedule, pipe))` equals `sample_pipeline(...)`, and the
pictures change both sides the same way.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402

from diffusers_helpers import gen, one_thread, rel_err  # noqa: E402, F401

TOL = torch.finfo(torch.float32).eps * 2000  # float32 rounding over a few tiny transformer calls and steps


def check_pictures(case, other_pictures):
    """The teacher is the pipeline's run of it and its own 8-step run; the searched schedule agrees on both
    sides; other pictures change both sides alike. Returns the search result."""
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=8, seed=1, **call)
    teacher = tiny.pipeline_latents(pipe, **embeds, **call, **od.pipeline_kwargs(result.teacher, pipe),
                                    generator=gen(1))
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, teacher) < TOL and rel_err(result.teacher_samples, own) < TOL
    runs = []
    for image in (call["image"], other_pictures):
        ours = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **{**call, "image": image})
        theirs = tiny.pipeline_latents(pipe, **embeds, **{**call, "image": image},
                                       **od.pipeline_kwargs(result.schedule, pipe), generator=gen(4))
        assert ours.shape == theirs.shape and rel_err(ours, theirs) < TOL
        runs.append(ours)
    assert rel_err(runs[1], runs[0]) > 1e-3  # the pictures reach the transformer
    return result


def white(picture):
    from PIL import Image

    return Image.new("RGB", picture.size, "white")


# --------------------------------------------------------------------------------------- Flux 2

def test_flux2_reference_images():
    case = tiny.flux2_reference()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    first, second = call["image"]
    result = check_pictures(case, [first, white(second)])
    # without height / width the call runs at the first picture's size (64 x 96: 16 x 24 latents, 8 x 12 tokens)
    sized = od.pipeline_inputs(pipe, embeds, 3.0, image=[first, second])
    assert (sized.height, sized.width) == (64, 96) and sized.cond["image_latents"].shape[1] == 8 * 12 + 10 * 8
    with pytest.raises(OptimalStepsError, match="^Flux2Pipeline reference image: Image too small"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": first.resize((32, 32))})
    with pytest.raises(OptimalStepsError, match="reference image: Image must be a PIL.Image.Image"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": torch.zeros(1, 3, 64, 64)})
    inpaint = diffusers.Flux2KleinInpaintPipeline(**tiny.flux2_klein_reference().pipe.components)
    with pytest.raises(OptimalStepsError, match=r"^Flux2KleinInpaintPipeline \(inpainting\) is not reproduced yet"):
        od.pipeline_inputs(inpaint, embeds, height=32, width=32)
    bare = tiny.flux2()
    with pytest.raises(OptimalStepsError, match="^Flux2Pipeline needs its VAE to encode reference images$"):
        od.sample_pipeline(bare.pipe, bare.prompts, result.schedule, **call)


def test_flux2_klein_reference_image_under_cfg():
    case = tiny.flux2_klein_reference()
    result = check_pictures(case, white(case.call["image"]))
    assert result.schedule.metadata["diffusers"]["guidance"] == "cfg"


# --------------------------------------------------------------------------------- QwenImage Edit Plus

def test_qwenimage_edit_plus_several_pictures():
    case = tiny.qwenimage_edit_plus()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert type(od.registry.family_of(pipe)).__name__ == "QwenImageEditPlus"
    first, second = call["image"]
    result = check_pictures(case, [first, white(second)])
    assert result.schedule.metadata["diffusers"]["family"] == "qwenimage-edit"
    # without height / width the call runs at the last picture's resized size (1:1 -> 1024 x 1024); the pictures'
    # tokens follow in their order (4:3 -> 1184 x 896: 37 x 28 tokens, 1:1: 32 x 32)
    sized = od.pipeline_inputs(pipe, embeds, image=[first, second], true_cfg_scale=3.0)
    assert (sized.height, sized.width) == (1024, 1024)
    tokens = sized.cond["image_latents"]
    assert tokens.shape[1] == 37 * 28 + 32 * 32
    swapped = od.pipeline_inputs(pipe, embeds, image=[second, first], true_cfg_scale=3.0).cond["image_latents"]
    assert torch.equal(swapped[:, : 32 * 32], tokens[:, 37 * 28:])
    with pytest.raises(OptimalStepsError, match="^QwenImageEditPlusPipeline takes one prompt per call, got 2$"):
        od.sample_pipeline(pipe, tiny.qwenimage().prompts, result.schedule, **call)
    with pytest.raises(OptimalStepsError, match=r"^QwenImageEditPlusPipeline needs image="):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": None})
    layered = diffusers.QwenImageLayeredPipeline(**pipe.components)  # its picture splits into layers: refused
    with pytest.raises(OptimalStepsError, match="^QwenImageLayeredPipeline is not reproduced yet"):
        od.pipeline_inputs(layered, embeds, image=first)
    with pytest.raises(OptimalStepsError, match="takes image= as PIL images, got Tensor"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": [first, torch.zeros(1, 3, 8, 8)]})
