"""CogView4 (and its Control pipeline) and HiDream on tiny random pipelines built in code (no downloads): the
search's teacher is the pipeline's own run, `pipe(..., **pipeline_kwargs(schedule, pipe))` equals
`sample_pipeline(...)`, and the call options change both sides the same way."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402

from diffusers_helpers import gen, one_thread, rel_err  # noqa: E402, F401
from test_diffusers import tokenizer, tokenizer_files  # noqa: E402, F401
from test_diffusers_families import TOL, Timesteps, check_family  # noqa: E402


def check_sequence_length(pipe):
    """From texts, with and without max_sequence_length: both sides agree, and the cut prompts change the result."""
    prompts, call = ["a red fox", "a cat"], dict(height=32, width=32, guidance_scale=4.0, negative_prompt="blur")
    full, _ = check_family(pipe, prompts, call, steps=2, teacher_steps=4)
    short, ours = check_family(pipe, prompts, call, steps=2, teacher_steps=4, max_sequence_length=3)
    cut = od.sample_pipeline(pipe, prompts, full.schedule, generator=gen(4), **call)
    assert rel_err(ours, cut) > 1e-3
    assert short.schedule.metadata["diffusers"]["max_sequence_length"] == 3


# ------------------------------------------------------------------------------------- CogView4

def test_cogview4_hands_its_integer_timesteps_with_the_sigmas():
    case = tiny.cogview4()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result, guided = check_family(pipe, embeds, call)
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["family"] == "cogview4" and recorded["dynamic_shift"] and recorded["guidance"] == "cfg"
    # the teacher is the pipeline's own 8-step run (int(linspace(1000, 1, 8)) shifted), not a linspace grid
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    # both arrays are handed: the network sees the integer timesteps, the scheduler steps the sigmas
    kwargs = od.pipeline_kwargs(result.schedule, pipe)
    assert len(kwargs["sigmas"]) == len(kwargs["timesteps"]) == 3
    assert all(isinstance(t, int) for t in kwargs["timesteps"])
    seen = Timesteps(pipe.transformer)
    tiny.pipeline_latents(pipe, **embeds, **{**call, "guidance_scale": 1.0}, **kwargs, generator=gen(4))
    assert seen.seen[::2] == [float(t) for t in kwargs["timesteps"]]
    # sigmas alone would be paired with the default linspace timesteps: another run
    alone = tiny.pipeline_latents(pipe, **embeds, **call, sigmas=kwargs["sigmas"], num_inference_steps=3,
                                  generator=gen(4))
    assert rel_err(alone, guided) > 1e-3
    plain = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **{**call, "guidance_scale": 1.0})
    assert rel_err(plain, guided) > 1e-3


def tiny_glm(files) -> object:
    torch.manual_seed(3)
    config = transformers.GlmConfig(vocab_size=files[1], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, pad_token_id=1,
                                    max_position_embeddings=64)
    return transformers.GlmModel(config).eval()


def test_cogview4_texts_and_max_sequence_length(tokenizer_files):
    pipe = tiny.cogview4().pipe
    pipe = diffusers.CogView4Pipeline(**{**pipe.components, "tokenizer": tokenizer(tokenizer_files),
                                         "text_encoder": tiny_glm(tokenizer_files)})
    pipe.set_progress_bar_config(disable=True)
    check_sequence_length(pipe)


def test_cogview4_control_latents():
    case = tiny.cogview4_control()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    assert od.pipeline_family(pipe) == "cogview4"
    # the pipeline samples the control latents from torch's global random state: seeded the same on both sides
    result = od.search_pipeline(pipe, embeds, steps=2, teacher_steps=6, seed=1, **call)
    torch.manual_seed(5)
    ours = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **call)
    torch.manual_seed(5)
    theirs = tiny.pipeline_latents(pipe, **embeds, **call, **od.pipeline_kwargs(result.schedule, pipe),
                                   generator=gen(4))
    assert ours.shape == theirs.shape and rel_err(ours, theirs) < TOL
    torch.manual_seed(5)
    other = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4),
                               **{**call, "control_image": -call["control_image"]})
    assert rel_err(other, ours) > 1e-3  # the control picture reaches the network
    without = {k: v for k, v in call.items() if k != "control_image"}
    with pytest.raises(OptimalStepsError, match=r"^CogView4ControlPipeline needs control_image= "):
        od.sample_pipeline(pipe, embeds, result.schedule, **without)
    with pytest.raises(OptimalStepsError, match=r"^control_image is \(32, 32\) pixels, the call \(64, 64\)"):
        od.sample_pipeline(pipe, embeds, result.schedule, **{**call, "height": 64, "width": 64})
    with pytest.raises(OptimalStepsError, match="^CogView4Pipeline takes no control_image$"):
        od.sample_pipeline(tiny.cogview4().pipe, tiny.cogview4().prompts, result.schedule, **call)


def test_cogview4_refusals():
    case = tiny.cogview4()
    pipe, embeds = case.pipe, case.prompts
    with pytest.raises(OptimalStepsError, match="^CogView4Pipeline needs height and width divisible by 16, got 40x64$"):
        od.pipeline_inputs(pipe, embeds, height=40, width=64)
    with pytest.raises(OptimalStepsError, match="guidance needs negative_prompt_embeds"):
        od.pipeline_inputs(pipe, {"prompt_embeds": embeds["prompt_embeds"]}, height=64, width=64)
    pipe.scheduler = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(OptimalStepsError, match="only FlowMatchEulerDiscreteScheduler takes, not UniPC"):
        od.pipeline_family(pipe)


# -------------------------------------------------------------------------------------- HiDream

def test_hidream_four_embeddings_batched_cfg():
    case = tiny.hidream()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    result, guided = check_family(pipe, embeds, call)
    recorded = result.schedule.metadata["diffusers"]
    assert recorded["family"] == "hidream" and recorded["shift"] == 3.0 and recorded["guidance"] == "cfg"
    # the teacher is the pipeline's own 8-step run, whose default grid is shifted twice at the low end
    own = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=8, generator=gen(1))
    assert rel_err(result.teacher_samples, own) < TOL
    plain = od.sample_pipeline(pipe, embeds, result.schedule, generator=gen(4), **{**call, "guidance_scale": 1.0})
    assert rel_err(plain, guided) > 1e-3
    # each of the three embeddings reaches the network (the Llama ones are [layers, B, tokens, dim])
    for name in ("pooled_prompt_embeds", "prompt_embeds_t5", "prompt_embeds_llama3"):
        other = od.sample_pipeline(pipe, {**embeds, name: -embeds[name]}, result.schedule, generator=gen(4), **call)
        assert rel_err(other, guided) > 1e-4, name


def test_hidream_resizes_every_call_to_its_area():
    case = tiny.hidream()
    pipe, embeds = case.pipe, case.prompts
    # 32 x 128 keeps its area (64 x 64 pixels): non-square latents go through the transformer's padded path
    call = dict(height=32, width=128, guidance_scale=5.0)
    _, wide = check_family(pipe, embeds, call, steps=2, teacher_steps=4)
    assert wide.shape == (2, 4, 4, 16)
    assert (od.pipeline_inputs(pipe, embeds, height=16, width=16, guidance_scale=5.0).height) == 64


def test_hidream_unipc_runs_through_the_library_loop():
    scheduler = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=3.0)
    case = tiny.hidream(scheduler)
    pipe, embeds, call = case.pipe, case.prompts, case.call
    schedule = od.pipeline_schedule(pipe, 4)
    assert schedule.solver == "unipc"
    theirs = tiny.pipeline_latents(pipe, **embeds, **call, num_inference_steps=4, generator=gen(2))
    ours = od.sample_pipeline(pipe, embeds, schedule, generator=gen(2), solver="unipc", **call)
    assert rel_err(ours, theirs) < TOL
    with pytest.raises(OptimalStepsError, match="HiDreamImagePipeline takes no custom schedule"):
        od.pipeline_kwargs(schedule, pipe)
    result = od.search_pipeline(pipe, embeds, steps=2, teacher_steps=6, seed=3, solver="unipc", **call)
    assert result.schedule.steps == 2 and result.schedule.solver == "unipc"


def test_hidream_dynamic_mu_comes_from_the_transformers_largest_sequence():
    case = tiny.hidream(tiny.flow_scheduler())
    result, _ = check_family(case.pipe, case.prompts, case.call, steps=2, teacher_steps=4)
    # Flux's constants at transformer.max_seq (16 tokens), not the scheduler's base / max sequence lengths
    mu = result.schedule.metadata["diffusers"]["mu"]
    assert abs(mu - (0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256))) < 1e-12


def test_hidream_refusals():
    case = tiny.hidream()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    schedule = od.pipeline_teacher(pipe, 3)
    with pytest.raises(OptimalStepsError, match=r"^HiDream embeddings are pooled_prompt_embeds, "):
        od.sample_pipeline(pipe, {"prompt_embeds": embeds["prompt_embeds_t5"]}, schedule, **call)
    with pytest.raises(OptimalStepsError, match=r"^prompt_embeds_llama3 must be a floating-point tensor \[layers, B"):
        od.sample_pipeline(pipe, {**embeds, "prompt_embeds_llama3": embeds["prompt_embeds_llama3"][0]}, schedule,
                           **call)
    with pytest.raises(OptimalStepsError, match="^prompt_embeds_t5 has 1 prompts but pooled_prompt_embeds has 2$"):
        od.sample_pipeline(pipe, {**embeds, "prompt_embeds_t5": embeds["prompt_embeds_t5"][:1]}, schedule, **call)
    positives = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
    with pytest.raises(OptimalStepsError, match="needs the three negative_"):
        od.sample_pipeline(pipe, positives, schedule, **call)
    with pytest.raises(OptimalStepsError, match="all three negative HiDream embeddings, or none"):
        od.sample_pipeline(pipe, {**positives, "negative_pooled_prompt_embeds": embeds["pooled_prompt_embeds"]},
                           schedule, **call)
    with pytest.raises(OptimalStepsError, match="^HiDreamImagePipeline takes no true_cfg_scale$"):
        od.sample_pipeline(pipe, embeds, schedule, true_cfg_scale=2.0, **call)


def hidream_encoders(files) -> dict:
    """Tiny text encoders of HiDream's four kinds (CLIP-L / CLIP-G with projections, T5, Llama) and the hand-written
    letter tokenizer for each (the real ones cannot be built offline; the pipeline only calls them)."""
    torch.manual_seed(4)
    vocab = files[1]
    clip = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=128, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                               pad_token_id=1, eos_token_id=1)
    llama = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=1, attn_implementation="eager")
    parts = {"text_encoder": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip)),
             "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip)),
             "text_encoder_3": transformers.T5EncoderModel(t5), "text_encoder_4": transformers.LlamaForCausalLM(llama)}
    parts = {name: model.eval() for name, model in parts.items()}
    parts.update({f"tokenizer{suffix}": tokenizer(files) for suffix in ("", "_2", "_3", "_4")})
    return parts


def test_hidream_texts_and_max_sequence_length(tokenizer_files):
    pipe = diffusers.HiDreamImagePipeline(**{**tiny.hidream().pipe.components, **hidream_encoders(tokenizer_files)})
    pipe.default_sample_size = 4
    pipe.set_progress_bar_config(disable=True)
    check_sequence_length(pipe)


@pytest.mark.parametrize("build", [tiny.cogview4, tiny.cogview4_control, tiny.hidream])
def test_images_per_prompt(build):
    case = build()
    pipe, embeds, call = case.pipe, case.prompts, case.call
    if build is tiny.cogview4:  # its call repeats only the negatives it encodes: one prompt's embeddings
        embeds = {name: value[:1] for name, value in embeds.items()}
    schedule = od.pipeline_teacher(pipe, 3, call["height"], call["width"])
    kwargs = od.pipeline_kwargs(schedule, pipe, call["height"], call["width"])
    torch.manual_seed(5)  # CogView4 Control's control latents
    ours = od.sample_pipeline(pipe, embeds, schedule, generator=gen(6), images_per_prompt=2, **call)
    torch.manual_seed(5)
    theirs = tiny.pipeline_latents(pipe, **embeds, **call, **kwargs, generator=gen(6), num_images_per_prompt=2)
    assert ours.shape == theirs.shape and rel_err(ours, theirs) < TOL
    assert rel_err(ours[0], ours[1]) > 1e-3  # each image its own noise


def test_cogview4_given_negatives_with_images_per_prompt_are_refused():
    case = tiny.cogview4()
    with pytest.raises(OptimalStepsError, match="^CogView4Pipeline does not repeat given negative_prompt_embeds per "
                                                "image: with images_per_prompt=2 give one prompt at a time$"):
        od.pipeline_inputs(case.pipe, case.prompts, images_per_prompt=2, **case.call)
