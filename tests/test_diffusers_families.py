"""The pipeline families added after the first six, on tiny random pipelines built in code (no downloads).

For each: the search's teacher equals the pipeline's own run on the teacher grid (and its own many-step run),
`pipe(..., **pipeline_kwargs(schedule, pipe))` equals `sample_pipeline(...)` for the same seed, and the call
options (max_sequence_length, true CFG, ...) change both sides the same way.
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


def check_family(pipe, prompts, call, seed=1, steps=3, teacher_steps=8, **options):
    """The search's teacher is the pipeline's own run; pipeline_kwargs reproduces sample_pipeline."""
    result = od.search_pipeline(pipe, prompts, steps=steps, teacher_steps=teacher_steps, seed=seed, **call, **options)
    embeds = prompts if isinstance(prompts, dict) else {"prompt": prompts}
    teacher = tiny.pipeline_latents(pipe, **embeds, **call, **options, **od.pipeline_kwargs(result.teacher, pipe),
                            generator=gen(seed))
    assert rel_err(result.teacher_samples, teacher) < TOL
    ours = od.sample_pipeline(pipe, prompts, result.schedule, generator=gen(seed + 3), **call, **options)
    theirs = tiny.pipeline_latents(pipe, **embeds, **call, **options, **od.pipeline_kwargs(result.schedule, pipe),
                           generator=gen(seed + 3))
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < TOL
    return result, ours


# ------------------------------------------------------------------------------------ QwenImage

def test_qwenimage_true_cfg_and_sequence_length():
    case = tiny.qwenimage()
    pipe, embeds = case.pipe, case.prompts
    call = dict(height=64, width=64)
    result, guided = check_family(pipe, embeds, call, true_cfg_scale=3.0)
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["family"] == "qwenimage" and recorded["dynamic_shift"] and recorded["true_cfg_scale"] == 3.0
    # the teacher is the pipeline's own 8-step run: its default grid is the search's teacher grid
    own = tiny.pipeline_latents(pipe, **embeds, **call, true_cfg_scale=3.0, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    # the options change the model on both sides the same way
    short = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), max_sequence_length=3,
                               true_cfg_scale=3.0, **call)
    theirs = tiny.pipeline_latents(pipe, **embeds, **call, true_cfg_scale=3.0, max_sequence_length=3, generator=gen(4),
                           **od.pipeline_kwargs(result.schedule, pipe))
    assert rel_err(short, theirs) < TOL and rel_err(short, guided) > 1e-3
    plain = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), true_cfg_scale=1.0, **call)
    assert rel_err(plain, guided) > 1e-3


# -------------------------------------------------------------------------------------- Flux 2

def test_flux2_mu_follows_the_step_count():
    case = tiny.flux2()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result, _ = check_family(pipe, embeds, call)
    assert result.schedule.metadata["diffusers"]["guidance"] == "distilled"
    # mu differs between 3 and 8 steps, so a sigmas schedule must come with its step count
    kwargs = od.pipeline_kwargs(result.schedule, pipe)
    assert kwargs["num_inference_steps"] == 3
    assert abs(od.flow_shift(pipe, 64, 64, 3)[1]["mu"] - od.flow_shift(pipe, 64, 64, 8)[1]["mu"]) > 1e-3
    pipe.scheduler.set_timesteps(sigmas=kwargs["sigmas"], mu=od.flow_shift(pipe, 64, 64, 3)[1]["mu"])
    assert torch.allclose(pipe.scheduler.sigmas.double(), result.schedule.times, atol=1e-6)
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL


def test_flux2_klein_cfg():
    case = tiny.flux2_klein()
    pipe, embeds = case.pipe, case.prompts
    result, guided = check_family(pipe, embeds, case.call)
    assert result.schedule.metadata["diffusers"]["guidance"] == "cfg"
    plain = od.sample_pipeline(pipe, embeds, result.schedule, height=32, width=32, guidance_scale=1.0,
                               generator=gen(4))
    assert rel_err(plain, guided) > 1e-3


# -------------------------------------------------------------------------------------- Chroma

def test_chroma_masks_and_cfg():
    case = tiny.chroma()
    pipe, embeds = case.pipe, case.prompts
    check_family(pipe, embeds, dict(height=64, width=64, guidance_scale=3.0))
    with pytest.raises(OptimalStepsError, match="ChromaPipeline takes no true_cfg_scale"):
        od.sample_pipeline(pipe, embeds, od.pipeline_teacher(pipe, 4, 64, 64), height=64, width=64,
                           true_cfg_scale=2.0)


# ------------------------------------------------------------------------------------ refusals

def test_unsupported_pipelines_name_the_supported_families():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(OptimalStepsError, match=r"DDPMPipeline is not supported; supported families: Flux.*QwenImage"):
        od.pipeline_family(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    pipe = tiny.qwenimage().pipe
    pipe.scheduler = diffusers.DDIMScheduler()
    with pytest.raises(OptimalStepsError, match="flow-matching scheduler"):
        od.pipeline_family(pipe)
    inpaint = diffusers.FluxControlInpaintPipeline(**tiny.tiny_flux_parts())
    assert od.pipeline_family(inpaint) == "flux"  # recognised by its transformer, then refused for what it needs
    with pytest.raises(OptimalStepsError, match=r"FluxControlInpaintPipeline \(with mask_image, control_image, "
                                                r"strength\) is not reproduced yet"):
        od.pipeline_inputs(inpaint, tiny.flux().prompts, height=64, width=64)
    with pytest.raises(OptimalStepsError, match="unknown pipeline call option"):
        case = tiny.qwenimage()
        od.sample_pipeline(case.pipe, case.prompts, od.pipeline_teacher(case.pipe, 4, 64, 64), height=64,
                           width=64, max_seq_len=3)


# ------------------------------------------------------------------------------ Wan 2.2's experts

class Timesteps:
    """The timesteps a network is called at."""

    def __init__(self, module):
        self.seen = []
        module.register_forward_pre_hook(lambda _, args, kwargs: self.seen.extend(kwargs["timestep"].tolist()),
                                         with_kwargs=True)


def test_wan22_experts_switch_exactly_at_the_boundary():
    case = tiny.wan22()
    pipe, embeds = case.pipe, case.prompts
    call = dict(height=32, width=32, num_frames=5, guidance_scale=5.0)
    # the pipeline's own two-expert run, each expert with its own guidance scale, through the library's loop
    theirs = pipe(**embeds, num_inference_steps=6, generator=gen(2), output_type="latent", guidance_scale_2=2.0,
                  **call).frames
    ours = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 6, 32, 32), generator=gen(2),
                              guidance_scale_2=2.0, **call)
    assert rel_err(ours, theirs) < TOL
    result = od.search_pipeline(pipe, embeds, steps=4, teacher_steps=16, seed=0, **call)
    times = result.schedule.times.tolist()
    assert 0.875 in times and result.high_sigmas[-1] == result.low_sigmas[0] == 0.875
    assert result.high_sigmas + result.low_sigmas[1:] == times and result.split_step == times.index(0.875)
    assert result.experts == [1] * result.split_step + [2] * (4 - result.split_step)
    assert result.schedule.metadata["diffusers"]["pipeline"] == "WanPipeline"
    high, low = Timesteps(pipe.transformer), Timesteps(pipe.transformer_2)
    od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(0), **call)
    # CFG: two calls per step; each expert sees only its own side of the boundary
    assert len(high.seen) == 2 * result.split_step and len(low.seen) == 2 * (4 - result.split_step)
    assert min(high.seen) > 875.0 >= max(low.seen)
    with pytest.raises(OptimalStepsError, match="high_steps must be between 1 and 3"):
        od.search_pipeline(pipe, embeds, steps=4, teacher_steps=16, high_steps=4, **call)


# ------------------------------------------------------------------------------------------ UniPC

def test_unipc_flow_scheduler_takes_a_schedule():
    from optimalsteps.core.schedules import Schedule
    from optimalsteps.core.solvers import SOLVERS

    pipe = tiny.qwenimage().pipe
    pipe.scheduler = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=3.0)
    schedule = Schedule([1.0, 0.7, 0.3, 0.1, 0.0], "flow", solver="unipc" if "unipc" in SOLVERS else None)
    kwargs = od.pipeline_kwargs(schedule, pipe, height=64, width=64)
    assert od.flow_shift(pipe, 64, 64)[0] == 3.0
    pipe.scheduler.set_timesteps(sigmas=kwargs["sigmas"])
    # UniPC moves a first sigma of 1 down by 1e-6 (its log would be infinite); the rest is the schedule
    assert abs(float(pipe.scheduler.sigmas[0]) - 1.0) <= 1e-6 + torch.finfo(torch.float32).eps
    assert torch.allclose(pipe.scheduler.sigmas[1:].double(), schedule.times[1:], atol=1e-6)
    assert od.scheduler_solver(pipe.scheduler) == "unipc"
    if "unipc" not in SOLVERS:
        pytest.skip("sample_pipeline equality with UniPC needs the 'unipc' solver in core/solvers.py (engineer unipc)")
    embeds = {k: v for k, v in tiny.qwenimage().prompts.items() if not k.startswith("negative")}
    seen = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: seen.append(k["timestep"].clone()) or forward(*a, **k)
    ours = od.sample_pipeline(pipe, embeds, schedule, height=64, width=64, generator=gen(4), solver="unipc")
    theirs = tiny.pipeline_latents(pipe, **embeds, height=64, width=64, generator=gen(4), **kwargs)
    # the network sees the scheduler's integer timesteps, truncated from float64 sigmas: 0.1 is 99, not 100
    assert torch.equal(torch.stack(seen[:4]), torch.stack(seen[4:]))
    assert torch.allclose(torch.stack(seen[4:])[:, 0] * 1000, torch.tensor([999.0, 699.0, 300.0, 99.0]))
    assert rel_err(ours, theirs) < TOL


# ------------------------------------------------------------------------------------------ Z-Image

def test_zimage_list_embeddings_reversed_time_and_its_cfg():
    case = tiny.zimage()
    pipe, embeds = case.pipe, case.prompts
    call = dict(height=64, width=64, guidance_scale=2.0)
    result, guided = check_family(pipe, embeds, call)
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    plain = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **{**call, "guidance_scale": 0.0})
    assert rel_err(plain, guided) > 1e-3


# ---------------------------------------------------------------------------------- Flux Kontext

def test_flux_kontext_reference_image_and_max_area():
    case = tiny.flux_kontext()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result, with_image = check_family(pipe, embeds, call)
    assert od.pipeline_family(pipe) == "flux" and result.schedule.metadata["diffusers"]["max_area"] == 64 * 64
    without = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **{**call, "image": None})
    assert rel_err(without, with_image) > 1e-3  # the reference image reaches the transformer
    # the call's size is fitted to max_area as the pipeline fits it
    fitted = od.pipeline_inputs(pipe, embeds, 3.5, 64, 32, max_area=64 * 64)
    assert (fitted.height, fitted.width) == (80, 32)  # sqrt(4096 * 2) = 90.5 and sqrt(4096 / 2) = 45, floored to 16
    with pytest.raises(OptimalStepsError, match="FluxPipeline takes no image"):
        od.sample_pipeline(tiny.flux().pipe, embeds, result.schedule, **call)


# --------------------------------------------------------------------------------- Flux Img2Img

def test_flux_img2img_strength_starts_the_schedule():
    case = tiny.flux_img2img()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    plain = {k: v for k, v in call.items() if k != "strength"}  # pipeline_kwargs brings strength 1.0
    default = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=8, seed=1, **plain)
    assert default.schedule.metadata["diffusers"]["strength"] == 0.6  # the __call__ default, recorded
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=8, seed=1, **call)
    for schedule, seed in ((result.teacher, 1), (result.schedule, 4)):
        ours = od.sample_pipeline(pipe, embeds, schedule, generator=gen(seed), **call)
        theirs = tiny.pipeline_latents(pipe, **embeds, **plain, **od.pipeline_kwargs(schedule, pipe),
                                       generator=gen(seed))
        assert rel_err(ours, theirs) < TOL
    assert rel_err(ours, od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **plain)) < TOL
    teacher = result.teacher.times
    # 8 teacher steps at strength 0.6: the pipeline skips int(8 - 4.8) = 3 sigmas and runs 5 steps
    assert result.teacher.steps == 5 and float(result.schedule.times[0]) == float(teacher[0]) < 1.0
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL  # the teacher is the pipeline's own 8-step run
    # a weaker strength starts later: less noise, closer to the image's latents
    weak = od.search_pipeline(pipe, embeds, steps=2, teacher_steps=8, seed=1, **{**call, "strength": 0.3})
    assert float(weak.teacher.times[0]) < float(teacher[0])
    image = pipe._pack_latents(call["image"].repeat(2, 1, 1, 1), 2, 4, 8, 8)
    assert rel_err(weak.teacher_samples, image) < rel_err(result.teacher_samples, image)
    kwargs = od.pipeline_kwargs(result.schedule, pipe, strength=0.6)
    assert kwargs["strength"] == 1.0 and len(kwargs["sigmas"]) == 3
    with pytest.warns(od.SettingsWarning, match="searched at strength 0.6, not 0.3"):
        od.pipeline_kwargs(result.schedule, pipe, strength=0.3)
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(OptimalStepsError, match=r"strength must be a number in \(0, 1\], got"):
            od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "strength": bad})
        with pytest.raises(OptimalStepsError, match=r"strength must be a number in \(0, 1\], got"):
            od.pipeline_kwargs(result.schedule, pipe, strength=bad)
    with pytest.raises(OptimalStepsError, match="FluxImg2ImgPipeline needs an image"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": None})
    with pytest.raises(OptimalStepsError, match="FluxPipeline takes no strength"):
        od.pipeline_kwargs(result.schedule, tiny.flux().pipe, strength=0.6)


def test_flux_img2img_pixels_through_the_vae():
    case = tiny.flux_img2img_pixels()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result = od.search_pipeline(pipe, embeds, steps=2, teacher_steps=8, seed=1, **call)
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL  # the VAE's sampled latents drew from the generator first
    ours = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **call)
    theirs = tiny.pipeline_latents(pipe, **{**embeds, **call, **od.pipeline_kwargs(result.schedule, pipe)},
                                   generator=gen(4))
    assert rel_err(ours, theirs) < TOL


# -------------------------------------------------------------------------------------- AuraFlow

def test_auraflow_batched_cfg():
    case = tiny.auraflow()
    result, guided = check_family(case.pipe, case.prompts, case.call)
    assert result.schedule.metadata["diffusers"]["shift"] == 1.73
    plain = od.sample_pipeline(case.pipe, case.prompts, result.schedule, generator=gen(4),
                               **{**case.call, "guidance_scale": 1.0})
    assert rel_err(plain, guided) > 1e-3


# --------------------------------------------------------------------------------------- Lumina 2

def test_lumina2_reversed_time_renormalised_cfg():
    case = tiny.lumina2()
    result, guided = check_family(case.pipe, case.prompts, case.call)
    own = tiny.pipeline_latents(case.pipe, **case.prompts, **case.call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    plain = od.sample_pipeline(case.pipe, case.prompts, result.schedule, generator=gen(4),
                               **{**case.call, "guidance_scale": 1.0})
    assert rel_err(plain, guided) > 1e-3


# ------------------------------------------------------------------------------ Wan image-to-video

def test_wan_image_to_video_through_the_library_loop():
    case = tiny.wan_i2v()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "wan-i2v"
    theirs = pipe(**embeds, num_inference_steps=4, generator=gen(2), output_type="latent", **call).frames
    ours = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), generator=gen(2), **call)
    assert ours.shape == theirs.shape and rel_err(ours, theirs) < TOL
    other = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), generator=gen(2),
                               **{**call, "image": -call["image"]})
    assert rel_err(other, ours) > 1e-3  # the first frame reaches the network
    result = od.search_pipeline(pipe, embeds, steps=2, teacher_steps=6, seed=3, **call)
    assert result.schedule.steps == 2 and result.schedule.metadata["diffusers"]["family"] == "wan-i2v"
    with pytest.raises(OptimalStepsError, match="needs image="):
        od.sample_pipeline(pipe, embeds, result.schedule, **{k: v for k, v in call.items() if k != "image"})


# ------------------------------------------------------------------------------------------- SANA

def test_sana_batched_cfg_and_resolution_binning():
    case = tiny.sana()
    result, guided = check_family(case.pipe, case.prompts, case.call)
    plain = od.sample_pipeline(case.pipe, case.prompts, result.schedule, generator=gen(4),
                               **{**case.call, "guidance_scale": 1.0})
    assert rel_err(plain, guided) > 1e-3
    # the pipeline snaps sizes to aspect-ratio bins by default; a tiny transformer has no bins
    with pytest.raises(OptimalStepsError, match="no bins for sample_size 8"):
        od.pipeline_inputs(case.pipe, case.prompts, height=256, width=256)


# ------------------------------------------------------------------------------- HunyuanVideo 1.5

def test_hunyuanvideo15_guider_and_two_text_encoders():
    case = tiny.hunyuanvideo15()
    result, guided = check_family(case.pipe, case.prompts, case.call)
    assert result.schedule.metadata["diffusers"]["guidance"] == "cfg"
    case.pipe.guider = case.pipe.guider.new(guidance_scale=1.0)
    plain = od.sample_pipeline(case.pipe, case.prompts, result.schedule, generator=gen(4), **case.call)
    assert rel_err(plain, guided) > 1e-3
    case.pipe.guider = case.pipe.guider.new(guidance_scale=6.0, stop=0.5)
    with pytest.raises(OptimalStepsError, match="plain ClassifierFreeGuidance guider"):
        od.sample_pipeline(case.pipe, case.prompts, result.schedule, **case.call)


# ------------------------------------------------------------------------------ QwenImage Edit

def test_qwenimage_edit_reference_picture():
    from PIL import Image

    case = tiny.qwenimage_edit()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result, edited = check_family(pipe, embeds, call)
    assert od.pipeline_family(pipe) == "qwenimage-edit"
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["family"] == "qwenimage-edit" and recorded["dynamic_shift"] and recorded["true_cfg_scale"] == 3.0
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    # the reference picture reaches the transformer
    white = {**call, "image": Image.new("RGB", call["image"].size, "white")}
    other = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **white)
    assert rel_err(other, edited) > 1e-3
    # without height / width the call runs at the picture's size, resized to about 1024 x 1024 (4:3 -> 1184 x 896)
    sized = od.pipeline_inputs(pipe, embeds, image=call["image"], true_cfg_scale=3.0)
    assert (sized.height, sized.width) == (896, 1184)
    without = {k: v for k, v in call.items() if k != "image"}
    with pytest.raises(OptimalStepsError, match=r"^QwenImageEditPipeline needs image= \(the picture to edit\)$"):
        od.sample_pipeline(pipe, embeds, result.schedule, **without)
    with pytest.raises(OptimalStepsError, match="takes image= as a PIL image, got Tensor"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(OptimalStepsError, match="QwenImagePipeline takes no image"):
        od.sample_pipeline(tiny.qwenimage().pipe, embeds, result.schedule, **call)
