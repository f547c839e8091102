"""The diffusers integration on tiny randomly initialised pipelines built in code (no downloads).

For every supported pipeline: the search runs through the pipeline's own network, guidance and latents
(its teacher output equals the pipeline's own run on the teacher schedule), and the pipeline's output with
`pipeline_kwargs(schedule, pipe)` equals `sample_pipeline(...)` for the same generator seed.
"""

from __future__ import annotations

import json
import os
import string

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.cli import main  # noqa: E402
from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.core.schedules import Schedule  # noqa: E402

from diffusers_helpers import (flux_embeds, gen, one_thread, rel_err, tiny_dit, tiny_flux,  # noqa: E402, F401
                               tiny_vae)

TOKENS = 16  # tokenizer / text encoder length: short prompts, no truncation


# ------------------------------------------------------------------------------ tiny pipelines

@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A CLIP BPE tokenizer written by hand: one token per letter, no merges."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder, len(vocab)


def tokenizer(files):
    folder, _ = files
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS)


def clip(files, projection: bool, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=files[1], hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=TOKENS, projection_dim=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def sd3_pipe(files, shift: float = 3.0):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=None,
        text_encoder=clip(files, True, 2), tokenizer=tokenizer(files), text_encoder_2=clip(files, True, 3),
        tokenizer_2=tokenizer(files), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipe():
    return tiny_flux()


def unet(sdxl: bool):
    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 16)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, **extra).eval()


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sd_pipe(files, scheduler=None):
    # "leading" spacing with steps_offset, as Stable Diffusion 1.x configures its schedulers
    scheduler = scheduler or diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip(files, False, 2), tokenizer=tokenizer(files), unet=unet(False),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipe():
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction",
                                                 timestep_spacing="trailing")
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet(True), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_embeds(batch: int) -> dict:
    g = gen(11)
    return {"prompt_embeds": torch.randn(batch, 6, 16, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 6, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}


def dit_pipe():
    return tiny_dit(tiny_vae(), {207: "golden retriever", 281: "tabby, tabby cat"})


def wan_pipe():
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_embeds(batch: int) -> dict:
    g = gen(13)
    return {"prompt_embeds": torch.randn(batch, 8, 16, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 8, 16, generator=g)}


def check_search(result, steps: int, pipeline: str) -> None:
    schedule = result.schedule
    assert schedule.steps == steps and result.teacher.steps == 12
    recorded = schedule.metadata["diffusers"]
    assert recorded["pipeline"] == pipeline
    # the file round trip keeps the process (a VE process is named by its sigma_max)
    assert Schedule.from_dict(json.loads(json.dumps(schedule.to_dict()))).process == schedule.process


# ------------------------------------------------------------------------------------- SD3

def test_sd3_search_runs_the_pipeline_and_kwargs_reproduce_sample(tokenizer_files):
    pipe = sd3_pipe(tokenizer_files, shift=3.0)
    prompts = ["a red cat", "a dog"]
    result = od.search_pipeline(pipe, prompts, steps=3, teacher_steps=12, guidance_scale=4.0, height=64, width=64,
                                seed=3)
    check_search(result, 3, "StableDiffusion3Pipeline")
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["shift"] == 3.0 and recorded["guidance"] == "cfg" and recorded["prompts"] == prompts
    call = dict(guidance_scale=4.0, height=64, width=64, output_type="latent")
    # the teacher the search ran is the pipeline itself on the teacher grid, from the same seed
    teacher = pipe(prompts, **od.pipeline_kwargs(result.teacher, pipe), generator=gen(3), **call).images
    assert rel_err(result.teacher_samples, teacher) < 1e-4
    unguided = pipe(prompts, **od.pipeline_kwargs(result.teacher, pipe), generator=gen(3),
                    **{**call, "guidance_scale": 1.0}).images
    assert rel_err(unguided, teacher) > 1e-2  # guidance matters, so the agreement above is not trivial
    for schedule in (result.schedule, result.teacher):
        ours = od.sample_pipeline(pipe, prompts, schedule, guidance_scale=4.0, height=64, width=64, generator=gen(5))
        theirs = pipe(prompts, **od.pipeline_kwargs(schedule, pipe), generator=gen(5), **call).images
        assert ours.shape == theirs.shape == (2, 4, 8, 8)
        assert rel_err(ours, theirs) < 1e-4


def test_flow_kwargs_undo_the_scheduler_shift(tokenizer_files):
    pipe = sd3_pipe(tokenizer_files, shift=3.0)
    schedule = Schedule([1.0, 0.7, 0.3, 0.1, 0.0], "flow", solver="euler")
    scheduler = pipe.scheduler
    scheduler.set_timesteps(**od.pipeline_kwargs(schedule, pipe))
    assert torch.allclose(scheduler.sigmas.double(), schedule.times, atol=1e-6)
    default = od.pipeline_schedule(pipe, 4)  # the pipeline's own 4-step schedule, shifted
    assert default.times[1] > 0.75 and default.solver == "euler"


# ------------------------------------------------------------------------------------- Flux

def test_flux_dynamic_shift_distilled_and_true_cfg():
    pipe = flux_pipe()
    embeds = flux_embeds(2)
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=12, guidance_scale=3.5, height=64, width=64,
                                seed=1)
    check_search(result, 3, "FluxPipeline")
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["dynamic_shift"] and recorded["guidance"] == "distilled" and recorded["prompts"] == "embeddings"
    assert abs(recorded["mu"] - 0.5) > 0.05  # the shift is not neutral at this resolution
    call = dict(guidance_scale=3.5, height=64, width=64, output_type="latent")
    teacher = pipe(**embeds, **od.pipeline_kwargs(result.teacher, pipe), generator=gen(1), **call).images
    assert rel_err(result.teacher_samples, teacher) < 1e-4
    ours = od.sample_pipeline(pipe, embeds, result.schedule, guidance_scale=3.5, height=64, width=64,
                              generator=gen(4))
    theirs = pipe(**embeds, **od.pipeline_kwargs(result.schedule, pipe), generator=gen(4), **call).images
    assert ours.shape == theirs.shape == (2, 16, 16)  # packed latents, as the pipeline returns them
    assert rel_err(ours, theirs) < 1e-4
    # true CFG: a second, negative call per step, as FluxPipeline does with true_cfg_scale > 1
    negative = {"negative_" + k: v for k, v in flux_embeds(2, seed=8).items()}
    ours = od.sample_pipeline(pipe, {**embeds, **negative}, result.schedule, guidance_scale=3.5, height=64,
                              width=64, generator=gen(4), true_cfg_scale=2.0)
    theirs = pipe(**embeds, **negative, true_cfg_scale=2.0, **od.pipeline_kwargs(result.schedule, pipe),
                  generator=gen(4), **call).images
    assert rel_err(ours, theirs) < 1e-4


def test_flux_kwargs_warn_when_run_at_another_resolution():
    pipe = flux_pipe()
    result = od.search_pipeline(pipe, flux_embeds(1), steps=2, teacher_steps=6, height=64, width=64)
    with pytest.warns(od.SettingsWarning, match="height 64 -> 32.*mu"):
        kwargs = od.pipeline_kwargs(result.schedule, pipe, height=32, width=32)
    # still exact at the call's resolution: mu is the one the pipeline computes there
    pipe.scheduler.set_timesteps(**kwargs, mu=od.flow_shift(pipe, 32, 32)[1]["mu"])
    assert torch.allclose(pipe.scheduler.sigmas.double(), result.schedule.times, atol=1e-6)
    with pytest.warns(od.SettingsWarning, match="guidance_scale 3.5 -> 1.0"):
        od.pipeline_kwargs(result.schedule, pipe, guidance_scale=1.0)


# ---------------------------------------------------------------------------------- SD, SDXL

def test_sd_unet_euler_leading_spacing(tokenizer_files):
    pipe = sd_pipe(tokenizer_files)
    prompts = ["a cat"]
    result = od.search_pipeline(pipe, prompts, steps=3, teacher_steps=12, guidance_scale=5.0, height=16, width=16,
                                seed=2, images_per_prompt=2)
    check_search(result, 3, "StableDiffusionPipeline")
    assert result.schedule.process.kind == "ve" and abs(result.schedule.process.sigma_max - 14.6146) < 1e-3
    call = dict(guidance_scale=5.0, height=16, width=16, num_images_per_prompt=2, output_type="latent")
    teacher = pipe(prompts, **od.pipeline_kwargs(result.teacher, pipe), generator=gen(2), **call).images
    assert rel_err(result.teacher_samples, teacher) < 1e-4
    kwargs = od.pipeline_kwargs(result.schedule, pipe)
    assert len(kwargs["sigmas"]) == 4 and kwargs["sigmas"][-1] == 0.0  # EulerDiscrete wants the terminal 0
    ours = od.sample_pipeline(pipe, prompts, result.schedule, guidance_scale=5.0, height=16, width=16,
                              generator=gen(6), images_per_prompt=2)
    theirs = pipe(prompts, **kwargs, generator=gen(6), **call).images
    assert rel_err(ours, theirs) < 1e-4


def test_sd_integer_timestep_schedulers(tokenizer_files):
    pipe = sd_pipe(tokenizer_files, diffusers.DPMSolverMultistepScheduler(**SD_BETAS))
    schedule = od.pipeline_teacher(pipe, 6)
    with pytest.warns(od.SettingsWarning, match=r"integer timesteps only: rounding moved the schedule's sigmas by"):
        kwargs = od.pipeline_kwargs(schedule, pipe)
    timesteps = kwargs["timesteps"]
    assert timesteps == sorted(timesteps, reverse=True) and all(isinstance(t, int) for t in timesteps)
    assert len(timesteps) == 6 and timesteps[0] == 999
    pipe.scheduler = diffusers.DDIMScheduler(**SD_BETAS)
    with pytest.raises(OptimalStepsError, match="DDIMScheduler takes no custom schedule"):
        od.pipeline_kwargs(schedule, pipe)


def test_sdxl_v_prediction_with_embeddings():
    pipe = sdxl_pipe()
    embeds = sdxl_embeds(2)
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=12, guidance_scale=3.0, height=16, width=16,
                                seed=9)
    check_search(result, 3, "StableDiffusionXLPipeline")
    assert result.schedule.metadata["diffusers"]["prediction"] == "v_prediction"
    call = dict(guidance_scale=3.0, height=16, width=16, output_type="latent")
    teacher = pipe(**embeds, **od.pipeline_kwargs(result.teacher, pipe), generator=gen(9), **call).images
    assert rel_err(result.teacher_samples, teacher) < 1e-4
    ours = od.sample_pipeline(pipe, embeds, result.schedule, guidance_scale=3.0, height=16, width=16,
                              generator=gen(3))
    theirs = pipe(**embeds, **od.pipeline_kwargs(result.schedule, pipe), generator=gen(3), **call).images
    assert rel_err(ours, theirs) < 1e-4


# --------------------------------------------------------------------------- DiT, Wan (no custom schedule)

def decoded_latents(pipe, call):
    """Run a pipeline that always decodes, recording the latents it hands the VAE."""
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    try:
        call()
    finally:
        pipe.vae.decode = decode
    return seen[0] * pipe.vae.config.scaling_factor


def test_dit_learned_sigma_class_guidance():
    pipe = dit_pipe()
    labels = [207, "tabby cat"]
    result = od.search_pipeline(pipe, labels, steps=3, teacher_steps=12, guidance_scale=4.0, seed=0)
    check_search(result, 3, "DiTPipeline")
    assert result.schedule.metadata["diffusers"]["prompts"] == [207, 281]
    with pytest.raises(OptimalStepsError, match="DiTPipeline takes no custom schedule"):
        od.pipeline_kwargs(result.schedule, pipe)
    # reproduce the pipeline's own 4-step DDIM run (DDIM's update is the project's euler)
    schedule = od.pipeline_schedule(pipe, 4)
    assert schedule.solver == "euler"
    theirs = decoded_latents(pipe, lambda: pipe(class_labels=[207, 281], guidance_scale=4.0, num_inference_steps=4,
                                                generator=gen(8), output_type="pt"))
    ours = od.sample_pipeline(pipe, labels, schedule, guidance_scale=4.0, generator=gen(8))
    assert rel_err(ours, theirs) < 1e-4
    unguided = od.sample_pipeline(pipe, labels, schedule, guidance_scale=1.0, generator=gen(8))
    assert rel_err(unguided, theirs) > 1e-2


def test_wan_custom_loop_reproduces_the_pipeline():
    pipe = wan_pipe()
    embeds = wan_embeds(1)
    call = dict(height=32, width=32, num_frames=5, guidance_scale=5.0)
    result = od.search_pipeline(pipe, embeds, steps=3, teacher_steps=12, seed=0, **call)
    check_search(result, 3, "WanPipeline")
    with pytest.raises(OptimalStepsError, match="WanPipeline takes no custom schedule"):
        od.pipeline_kwargs(result.schedule, pipe)
    schedule = od.pipeline_schedule(pipe, 4, height=32, width=32)
    theirs = pipe(**embeds, num_inference_steps=4, generator=gen(2), output_type="latent", **call).frames
    ours = od.sample_pipeline(pipe, embeds, schedule, generator=gen(2), **call)
    assert ours.shape == theirs.shape == (1, 4, 2, 4, 4)
    assert rel_err(ours, theirs) < 1e-4


# --------------------------------------------------------------------------------- bad input

class Counter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_bad_input_is_refused_before_heavy_work(tokenizer_files):
    pipe = sd3_pipe(tokenizer_files)
    encoder, net = Counter(pipe.text_encoder), Counter(pipe.transformer)
    bad = [
        (lambda: od.search_pipeline(pipe, ["a cat"], steps=2, teacher_steps=6, height=60), "divisible by 8"),
        (lambda: od.search_pipeline(pipe, ["a cat"], steps=2, teacher_steps=6, height=64, width=1024),
         "at most 16"),
        (lambda: od.search_pipeline(pipe, [], steps=2, teacher_steps=6), "non-empty list"),
        (lambda: od.search_pipeline(pipe, {"prompt_embeds": torch.zeros(2, 4, 32),
                                           "pooled_prompt_embeds": torch.zeros(3, 32)}, steps=2, teacher_steps=6),
         "pooled_prompt_embeds has 3 rows but prompt_embeds has 2"),
        (lambda: od.search_pipeline(pipe, {"prompt_embeds": torch.zeros(2, 4, 32)}, steps=2, teacher_steps=6),
         "needs pooled_prompt_embeds"),
        (lambda: od.search_pipeline(pipe, {"prompt_embeds": torch.zeros(1, 4, 32), "pooled_prompt_embeds":
                                           torch.zeros(1, 32), "negative_prompt_embeds": torch.zeros(1, 5, 32),
                                           "negative_pooled_prompt_embeds": torch.zeros(1, 32)},
                                    steps=2, teacher_steps=6), "negative_prompt_embeds has shape"),
        (lambda: od.search_pipeline(pipe, ["a"], steps=6, teacher_steps=6), r"steps \(6\) must be fewer"),
        (lambda: od.search_pipeline(pipe, ["a", "b"], steps=2, teacher_steps=6, negative_prompt=["x"]),
         "1 negative prompts for 2 prompts"),
    ]
    for call, message in bad:
        with pytest.raises(OptimalStepsError, match=message):
            call()
    assert encoder.calls == 0 and net.calls == 0
    with pytest.raises(OptimalStepsError, match="DDPMPipeline is not supported"):
        od.search_pipeline(diffusers.DDPMPipeline(unet=unet(False), scheduler=diffusers.DDPMScheduler()), ["x"],
                           steps=2)
    dit = dit_pipe()
    with pytest.raises(OptimalStepsError, match="generates 16x16 only"):
        od.sample_pipeline(dit, [1], od.pipeline_schedule(dit, 3), height=32, width=32)
    with pytest.raises(OptimalStepsError, match="out of range"):
        od.sample_pipeline(dit, [1000], od.pipeline_schedule(dit, 3))


# ---------------------------------------------------------------------------------------- CLI

def test_cli_search_with_a_saved_pipeline(tokenizer_files, tmp_path, capsys):
    folder = tmp_path / "tiny-sd"
    sd_pipe(tokenizer_files).save_pretrained(folder)
    out = tmp_path / "sd.json"
    args = ["search", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--prompt", "a dog", "--guidance", "4",
            "--height", "16", "--width", "16", "--steps", "2", "--teacher-steps", "6", "--samples", "2",
            "--seed", "1", "--out", str(out)]
    assert main(args) == 0
    schedule = Schedule.load(out)
    recorded = schedule.metadata["diffusers"]
    assert schedule.steps == 2 and recorded["prompts"] == ["a cat", "a dog"]
    assert recorded["guidance_scale"] == 4.0 and recorded["height"] == 16
    assert schedule.metadata["model"] == f"diffusers:{folder}"
    assert main(args) == 2  # the output exists: refused without --force
    capsys.readouterr()
    assert main(args[:-2] + ["--height", "12", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "divisible by 8" in err and len(err.splitlines()) == 1
    assert main(["search", "--model", f"diffusers:{tmp_path / 'missing'}", "--prompt", "a", "--steps", "2",
                 "--out", str(tmp_path / "y.json")]) == 2
