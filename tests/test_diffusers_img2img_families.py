"""Img2img and inpainting beyond Flux's first variants (QwenImage, QwenImage Edit, Chroma, Z-Image, Flux Kontext) on tiny random pipelines built
in code (pixels through tiny VAEs, no downloads): the search's teacher is the pipeline's own run at the call's
strength, `pipe(..., **pipeline_kwargs(schedule, pipe))` equals `sample_pipeline(...)` for the same seed, and the
image, the mask and the strength change both sides the same way."""

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
from test_diffusers_flux_variants import TOL, assert_unmasked_ends_on_image, check_variant, same_run  # noqa: E402

IMG2IMG = {"qwenimage-img2img": "QwenImageImg2Img", "chroma-img2img": "ChromaImg2Img",
           "zimage-img2img": "ZImageImg2Img"}
INPAINT = {"qwenimage-inpaint": "QwenImageInpaint", "chroma-inpaint": "ChromaInpaint",
           "zimage-inpaint": "ZImageInpaint", "qwenimage-edit-inpaint": "QwenImageEditInpaint",
           "flux-kontext-inpaint": "FluxKontextInpaint"}


def other_picture(case):
    """Another picture of the same kind (a PIL picture's colours inverted, a tensor's flipped)."""
    image = case.call["image"]
    if isinstance(image, torch.Tensor):
        return image.flip(-1)
    from PIL import ImageOps
    return ImageOps.invert(image.convert("RGB"))


@pytest.mark.parametrize("name", sorted(IMG2IMG))
def test_img2img_runs_as_the_pipeline(name):
    case = tiny.CASES[name]()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert type(od.registry.family_of(pipe)).__name__ == IMG2IMG[name]
    result, ours = check_variant(case)
    strength = call["strength"]
    assert result.schedule.metadata["diffusers"]["strength"] == strength and float(result.schedule.times[0]) < 1.0
    # another image changes both sides alike
    other, theirs = same_run(case, result.schedule, 4, image=other_picture(case))
    assert rel_err(other, theirs) < TOL and rel_err(other, ours) > 1e-3
    # another strength: the teacher starts elsewhere and still is the pipeline's own run at that strength
    weaker, _ = check_variant(case, strength=0.4)
    assert float(weaker.teacher.times[0]) < float(result.teacher.times[0])
    with pytest.raises(OptimalStepsError, match=rf"^{type(pipe).__name__} needs an image$"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": None})
    with pytest.raises(OptimalStepsError, match=r"strength must be a number in \(0, 1\]"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "strength": 1.5})
    with pytest.raises(OptimalStepsError, match="takes image= as pixels, not latents"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": torch.zeros(1, 4, 8, 8)})


@pytest.mark.parametrize("name", sorted(INPAINT))
def test_inpainting_keeps_the_unmasked_image(name):
    case = tiny.CASES[name]()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert type(od.registry.family_of(pipe)).__name__ == INPAINT[name]
    result, ours = check_variant(case)
    assert result.schedule.metadata["diffusers"]["strength"] == call["strength"]
    # the unmasked latents end on the image's (sampled by the VAE from the seed), whatever the solver
    inputs = od.pipeline_inputs(pipe, embeds, **call)
    assert_unmasked_ends_on_image(pipe, embeds, call, inputs, result.schedule, ours)
    # another mask repaints elsewhere, on both sides alike
    mask = call["mask_image"]
    flipped = mask.transpose(0) if not isinstance(mask, torch.Tensor) else 1 - mask
    other, theirs = same_run(case, result.schedule, 4, mask_image=flipped)
    assert rel_err(other, theirs) < TOL and rel_err(other, ours) > 1e-3
    cls = type(pipe).__name__
    with pytest.raises(OptimalStepsError, match=rf"^{cls} needs image= and mask_image="):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "mask_image": None})
    with pytest.raises(OptimalStepsError, match=r"strength must be a number in \(0, 1\]"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "strength": 0})


def test_zimage_img2img_runs_at_its_image_size():
    case = tiny.zimage_img2img()
    sized = od.pipeline_inputs(case.pipe, case.prompts, image=case.call["image"], guidance_scale=2.0)
    assert (sized.height, sized.width) == (16, 16)  # the picture's size, as the pipeline runs without height / width
    with pytest.raises(OptimalStepsError, match=r"^ZImageImg2ImgPipeline runs at its image's size 16x16 \(it does "
                                                r"not resize it\), not 32x32$"):
        od.pipeline_inputs(case.pipe, case.prompts, **{**case.call, "height": 32, "width": 32})


def test_kontext_inpaint_runs_at_the_kontext_resolution():
    case = tiny.flux_kontext_inpaint()
    assert (od.pipeline_inputs(case.pipe, case.prompts, **case.call).height) == 1024
    with pytest.raises(OptimalStepsError, match=r"runs at its image's Kontext resolution 1024x1024, not 64x64$"):
        od.pipeline_inputs(case.pipe, case.prompts, **case.call, height=64, width=64)


def test_edit_inpaint_refuses_another_size_and_tensors():
    case = tiny.qwenimage_edit_inpaint()
    with pytest.raises(OptimalStepsError, match=r"runs at its picture's resized size 896x1184, not 64x64$"):
        od.pipeline_inputs(case.pipe, case.prompts, **case.call, height=64, width=64)
    with pytest.raises(OptimalStepsError, match="takes image= as a PIL image, got Tensor"):
        od.pipeline_inputs(case.pipe, case.prompts, **{**case.call, "image": torch.rand(1, 3, 64, 64)})


def test_text_to_image_pipelines_take_no_image_inputs():
    for name in ("qwenimage", "chroma", "zimage"):
        case = tiny.CASES[name]()
        with pytest.raises(OptimalStepsError, match=rf"{type(case.pipe).__name__} takes no (strength|mask_image)"):
            od.pipeline_inputs(case.pipe, case.prompts, **case.call, strength=0.5)


def test_other_image_pipelines_of_the_families_are_refused_naming_the_supported_ones():
    case = tiny.qwenimage()

    class ControlledQwenImage(type(case.pipe)):  # a text-to-image loop taking a control picture
        def __call__(self, prompt=None, control_image=None, height=None, width=None, true_cfg_scale=4.0, **call):
            return super().__call__(prompt, height=height, width=width, true_cfg_scale=true_cfg_scale, **call)

    pipe = ControlledQwenImage(**case.pipe.components)
    with pytest.raises(OptimalStepsError, match=r"^ControlledQwenImage takes image inputs, which the qwenimage family "
                                                r"does not reproduce yet; supported: QwenImage \(.*"
                                                r"QwenImageInpaintPipeline\)$"):
        od.pipeline_inputs(pipe, case.prompts, **case.call)
