"""The video variants (Wan TI2V, first-and-last-frame and VACE; HunyuanVideo 1.5 image-to-video; LTX-2) on tiny
random pipelines built in code (no downloads).

Pipelines without a schedule argument (Wan): `sample_pipeline(pipeline_schedule(pipe, M))` equals
`pipe(num_inference_steps=M)`, and a search on the pipeline's own N-step grid has the pipeline's N-step run as its
teacher. Pipelines with one: `pipe(..., **pipeline_kwargs(schedule, pipe))` equals `sample_pipeline`. The call
options (images, video, mask, conditioning scale) change both sides the same way.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402

from diffusers_helpers import gen, one_thread, rel_err  # noqa: E402, F401
from test_diffusers_families import check_family  # noqa: E402

TOL = torch.finfo(torch.float32).eps * 2000  # float32 rounding over a few tiny transformer calls and steps
pytestmark = pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")


def own_run(pipe, prompts, call, steps, seed):
    return pipe(**prompts, **call, num_inference_steps=steps, generator=gen(seed), output_type="latent").frames


def check_loop(pipe, prompts, call, steps=2, teacher_steps=6, seed=1):
    """A pipeline without a schedule argument: the library's loop on the pipeline's own grids is the pipeline, and
    the search's teacher (the pipeline's N-step grid) is the pipeline's own N-step run."""
    h, w = call["height"], call["width"]
    ours = od.sample_pipeline(pipe, prompts, od.pipeline_schedule(pipe, 4, h, w), generator=gen(seed + 3), **call)
    theirs = own_run(pipe, prompts, call, 4, seed + 3)
    assert ours.shape == theirs.shape and rel_err(ours, theirs) < TOL
    result = od.search_pipeline(pipe, prompts, steps=steps, seed=seed,
                                teacher_schedule=od.pipeline_schedule(pipe, teacher_steps, h, w), **call)
    assert rel_err(result.teacher_samples, own_run(pipe, prompts, call, teacher_steps, seed)) < TOL
    return result, ours


# ------------------------------------------------------------------------------------------ Wan

def test_wan_ti2v_keeps_the_first_frame_clean():
    case = tiny.wan_ti2v()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "wan-i2v"
    seen = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: seen.append(k["timestep"].clone()) or forward(*a, **k)
    result, ours = check_loop(pipe, embeds, call)
    pipe.transformer.forward = forward
    # one timestep per token (3 frames of 4 x 4 tokens); the first frame's 16 tokens are clean: timestep 0
    assert seen[0].shape == (1, 48) and bool((seen[0][:, :16] == 0).all()) and bool((seen[0][:, 16:] > 0).all())
    # its first latent frame is the image's latents, in the pipeline's output and in ours
    condition = od.pipeline_inputs(pipe, embeds, **call).cond["condition"]
    assert rel_err(ours[:, :, :1], condition) < TOL
    flipped = {**call, "image": -call["image"]}
    other = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), generator=gen(4), **flipped)
    assert rel_err(other, own_run(pipe, embeds, flipped, 4, 4)) < TOL and rel_err(other, ours) > 1e-3
    with pytest.raises(OptimalStepsError, match="last_image is ignored by Wan TI2V"):
        od.sample_pipeline(pipe, embeds, result.schedule, **call, last_image=call["image"])


def test_wan_first_and_last_frame():
    case = tiny.wan_flf2v()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    _, both = check_loop(pipe, embeds, call)
    first_only = {k: v for k, v in call.items() if k != "last_image"}
    first = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), generator=gen(4), **first_only)
    assert rel_err(first, own_run(pipe, embeds, first_only, 4, 4)) < TOL
    assert rel_err(first, both) > 1e-3  # the last frame reaches the network
    with pytest.raises(OptimalStepsError, match="WanPipeline takes no last_image"):
        od.sample_pipeline(tiny.wan21().pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), last_image=call["image"],
                           **{k: v for k, v in tiny.wan21().call.items()})


def test_wan_vace_control_video_mask_references_and_scale():
    case = tiny.wan_vace()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "wan-vace"
    result, controlled = check_loop(pipe, embeds, call)
    assert result.schedule.metadata["diffusers"]["conditioning_scale"] == 0.7
    # a reference picture adds a latent frame in front of the video's three
    assert controlled.shape[2] == 4
    for change in ({"conditioning_scale": [0.0, 1.5]}, {"reference_images": None}, {"mask": None}):
        changed = {**call, **change}
        ours = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 4, 16, 16), generator=gen(4), **changed)
        assert rel_err(ours, own_run(pipe, embeds, changed, 4, 4)) < TOL
        if ours.shape == controlled.shape:
            assert rel_err(ours, controlled) > 1e-3
    with pytest.raises(OptimalStepsError, match=r"conditioning_scale must be a number or 2 numbers"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "conditioning_scale": [1.0, 1.0, 1.0]})
    with pytest.raises(OptimalStepsError, match="one video per call: give one prompt"):
        two = {k: v.repeat(2, 1, 1) for k, v in embeds.items()}
        od.sample_pipeline(pipe, two, result.schedule, **call)
    with pytest.raises(OptimalStepsError, match="WanVACEPipeline takes no image"):
        od.sample_pipeline(pipe, embeds, result.schedule, **call, image=torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------- HunyuanVideo 1.5

def test_hunyuanvideo15_image_to_video():
    from PIL import Image

    case = tiny.hunyuanvideo15_i2v()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "hunyuanvideo15-i2v"
    result, ours = check_family(pipe, embeds, call)
    # the size follows the picture (4:3 at target size 32), and the first frame's latents reach the network
    assert (result.schedule.metadata["diffusers"]["height"], result.schedule.metadata["diffusers"]["width"]) == (28, 36)
    flipped = {**call, "image": call["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    other = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **flipped)
    theirs = tiny.pipeline_latents(pipe, **embeds, **flipped, **od.pipeline_kwargs(result.schedule, pipe),
                                   generator=gen(4))
    assert rel_err(other, theirs) < TOL and rel_err(other, ours) > 1e-3
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    with pytest.raises(OptimalStepsError, match="generates at the size it fits to the image, 28x36, not 32x32"):
        od.sample_pipeline(pipe, embeds, result.schedule, height=32, width=32, **call)
    with pytest.raises(OptimalStepsError, match="needs image=..., the first frame as a PIL picture"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image": torch.zeros(1, 3, 24, 32)})
    pipe.transformer.register_to_config(use_meanflow=True)
    with pytest.raises(OptimalStepsError, match="use_meanflow"):
        od.sample_pipeline(pipe, embeds, result.schedule, **call)


# ------------------------------------------------------------------------------------------ LTX-2

def ltx2_run(pipe, embeds, call, seed, **schedule):
    out = pipe(**embeds, **call, **schedule, generator=gen(seed), output_type="latent")
    return out.frames, out.audio


# the changed guidance differs from the searched one
@pytest.mark.filterwarnings("ignore::optimalsteps.integrations.diffusers.common.SettingsWarning")
def test_ltx2_video_and_audio_latents_as_one_state():
    from optimalsteps.integrations.diffusers.families.ltx2 import split_latents

    case = tiny.ltx2()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "ltx2"
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=8, seed=1, **call)
    model = od.pipeline_inputs(pipe, embeds, **call).model
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["num_frames"] == 5 and recorded["mu"] == pytest.approx(0.95 + 1.1 / 60 * (48 - 4))
    # the teacher is the pipeline's own 8-step run (linspace under mu of 3 x 4 x 4 video tokens), audio included
    for teacher in (od.pipeline_kwargs(result.teacher, pipe), {"num_inference_steps": 8}):
        video, audio = ltx2_run(pipe, embeds, call, 1, **teacher)
        ours = split_latents(pipe, result.teacher_samples, model)
        assert rel_err(ours[0], video) < TOL and rel_err(ours[1], audio) < TOL
    default = None
    for change in ({}, {"stg_scale": 0.0, "modality_scale": 1.0}, {"guidance_rescale": 0.0, "audio_guidance_scale": 2.0},
                   {"guidance_scale": 1.0, "audio_guidance_scale": 1.0}, {"frame_rate": 12.0},
                   {"motion_speed": 0.5, "use_cross_timestep": False}):
        changed = {**call, **change}
        video, audio = ltx2_run(pipe, embeds, changed, 4, **od.pipeline_kwargs(result.schedule, pipe))
        state = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **changed)
        ours = split_latents(pipe, state, od.pipeline_inputs(pipe, embeds, **changed).model)
        assert rel_err(ours[0], video) < TOL and rel_err(ours[1], audio) < TOL
        if default is None:
            default = ours
        elif ours[1].shape == default[1].shape:
            assert rel_err(ours[0], default[0]) > 1e-3  # each option reaches the network or the guidance
    with pytest.raises(OptimalStepsError, match="num_frames must be 1 more than a multiple of 2"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "num_frames": 6})
    with pytest.raises(OptimalStepsError, match="stg_scale must be a number"):
        od.sample_pipeline(pipe, embeds, result.schedule, **call, stg_scale="high")

    class OwnCall(diffusers.LTX2Pipeline):  # as LTX-2's image-to-video pipelines: the same parts, another call
        @functools.wraps(diffusers.LTX2Pipeline.__call__)
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    other = OwnCall(**pipe.components)
    with pytest.raises(OptimalStepsError, match="OwnCall changes LTX2Pipeline's call"):
        od.sample_pipeline(other, embeds, result.schedule, **call)
    with pytest.raises(OptimalStepsError, match="FluxPipeline takes no stg_scale"):
        od.sample_pipeline(tiny.flux().pipe, tiny.flux().prompts, result.schedule, height=64, width=64, stg_scale=1.0)


def test_video_families_from_their_model_index():
    from optimalsteps.integrations.diffusers.registry import family_from_index

    def index(name, transformer, **parts):
        return {"_class_name": name, "transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKL"],
                **{k: ["transformers", v] for k, v in parts.items()}}

    assert family_from_index(index("WanVACEPipeline", "WanVACETransformer3DModel")).name == "wan-vace"
    assert family_from_index(index("LTX2Pipeline", "LTX2VideoTransformer3DModel")).name == "ltx2"
    hunyuan = "HunyuanVideo15Transformer3DModel"
    assert family_from_index(index("HunyuanVideo15Pipeline", hunyuan)).name == "hunyuanvideo15"
    assert family_from_index(index("HunyuanVideo15ImageToVideoPipeline", hunyuan,
                                   image_encoder="SiglipVisionModel")).name == "hunyuanvideo15-i2v"


@pytest.mark.parametrize("build", [tiny.wan_ti2v, tiny.wan_vace])
def test_wan_variants_with_their_default_unipc_scheduler(build):
    """UniPC hands the network integer timesteps (per token under TI2V); the library's unipc solver follows it."""
    from optimalsteps.core.solvers import SOLVERS

    if "unipc" not in SOLVERS:
        pytest.skip("needs the 'unipc' solver in core/solvers.py")
    case = build()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    pipe.scheduler = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=5.0)
    ours = od.sample_pipeline(pipe, embeds, od.pipeline_schedule(pipe, 5, 16, 16), generator=gen(2), solver="unipc",
                              **call)
    assert rel_err(ours, own_run(pipe, embeds, call, 5, 2)) < TOL


def test_ltx2_image_to_video_keeps_the_first_frame():
    from PIL import Image

    from optimalsteps.integrations.diffusers.families.ltx2 import split_latents

    case = tiny.ltx2_i2v()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "ltx2-i2v"
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=8, seed=1, **call)
    model = od.pipeline_inputs(pipe, embeds, **call).model
    video, audio = ltx2_run(pipe, embeds, call, 1, num_inference_steps=8)
    ours = split_latents(pipe, result.teacher_samples, model)
    assert rel_err(ours[0], video) < TOL and rel_err(ours[1], audio) < TOL
    firsts = []
    for image in (call["image"], call["image"].transpose(Image.Transpose.FLIP_TOP_BOTTOM)):
        changed = {**call, "image": image}
        video, audio = ltx2_run(pipe, embeds, changed, 4, **od.pipeline_kwargs(result.schedule, pipe))
        ours = split_latents(pipe, od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **changed), model)
        assert rel_err(ours[0], video) < TOL and rel_err(ours[1], audio) < TOL
        firsts.append(ours[0][:, :, 0])
    # the first frame is the picture's latents, untouched by the steps: another picture, another first frame
    assert rel_err(firsts[0], firsts[1]) > 1e-2
    with pytest.raises(OptimalStepsError, match="needs image=..., the first frame"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{k: v for k, v in call.items() if k != "image"})
    with pytest.raises(OptimalStepsError, match="image_crf must be a whole number >= 0"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "image_crf": -1})
