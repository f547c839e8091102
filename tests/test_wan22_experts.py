"""Wan 2.2's two experts, for every solver: one search puts a step exactly on the boundary, each expert runs
only its own steps, and `sample_pipeline` on the searched schedule equals a hand-run of the two experts."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from optimalsteps.core.errors import OptimalStepsError  # noqa: E402
from optimalsteps.core.schedules import Schedule, check_steps  # noqa: E402
from optimalsteps.core.solvers import initial_state, solver_step  # noqa: E402
from optimalsteps.evaluation.baselines import make_schedule  # noqa: E402
from optimalsteps.evaluation.metrics import mse  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402
from optimalsteps.integrations.diffusers.run import draw_latents, sampler_noise  # noqa: E402
from optimalsteps.integrations.diffusers_compare import ImageMetrics, compare_pipeline  # noqa: E402

from diffusers_helpers import gen, one_thread, rel_err  # noqa: E402, F401

BOUNDARY = 0.875  # tiny.wan22's boundary_ratio
CALL = dict(height=32, width=32, num_frames=5, guidance_scale=5.0, guidance_scale_2=2.0)
SOLVERS = ("euler", "heun", "dpmpp2m", "unipc")


class Timesteps:
    """The timesteps a network is called at."""

    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_pre_hook(
            lambda _, args, kwargs: self.seen.extend(kwargs["timestep"].tolist()), with_kwargs=True)


def pure_experts(model):
    """The wrapped model as two single-network models: the high-noise expert and the low-noise one."""
    high, low = copy.copy(model), copy.copy(model)
    high.net_2 = None
    low.net, low.guidance, low.net_2 = model.net_2, model.guidance_2, None
    return high, low


def hand_run(pipe, prompts, schedule, solver, seed):
    """The schedule as one solver loop whose step k runs expert experts[k] alone, from the pipeline's latents."""
    inputs = od.pipeline_inputs(pipe, prompts, **CALL)
    high, low = pure_experts(inputs.model)
    times = schedule.times.tolist()
    noise = sampler_noise(pipe, draw_latents(pipe, inputs, gen(seed)), inputs.model.process, times[0])
    x = initial_state(inputs.model.process, noise, times[0])
    x0_prev = t_prev = correction = None
    for k, which in enumerate(schedule.metadata["experts"]):
        out = solver_step(solver, high if which == 1 else low, x, times[k], times[k + 1], x0_prev=x0_prev,
                          t_prev=t_prev, cond=inputs.cond, correction=correction)
        x, x0_prev, t_prev, correction = out.x, out.x0, times[k], out.correction
    return x


@pytest.fixture(scope="module")
def case():
    return tiny.wan22()


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_search_puts_a_step_on_the_boundary_for_every_solver(case, solver):
    pipe, prompts = case.pipe, case.prompts
    result = od.search_pipeline(pipe, prompts, steps=4, teacher_steps=16, seed=0, solver=solver, **CALL)
    times = result.schedule.times.tolist()
    split = result.split_step
    assert times[split] == BOUNDARY and result.high_sigmas[-1] == result.low_sigmas[0] == BOUNDARY
    assert result.high_sigmas + result.low_sigmas[1:] == times
    assert result.experts == [1] * split + [2] * (4 - split) == result.schedule.metadata["experts"]
    # one search: the plain DP on one teacher grid through the boundary, the teacher for the same solver
    assert result.result.schedule is result.schedule and BOUNDARY in result.result.teacher.times.tolist()
    assert result.schedule.solver == solver
    high, low = Timesteps(pipe.transformer), Timesteps(pipe.transformer_2)
    try:
        ours = od.sample_pipeline(pipe, prompts, result.schedule, generator=gen(3), solver=solver, **CALL)
    finally:
        high.handle.remove()
        low.handle.remove()
    # each expert sees only its own side; the boundary itself is the low expert's, except Heun's corrector
    # of the step that lands there, which is the high expert's last evaluation
    edge = BOUNDARY * 1000
    assert min(high.seen) > edge - (1e-3 if solver == "heun" else -1e-3) and max(low.seen) <= edge + 1e-3
    if solver == "heun":
        assert high.seen.count(edge) == 2 and low.seen.count(edge) == 2  # CFG: two calls each
    theirs = hand_run(pipe, prompts, result.schedule, solver, seed=3)
    assert rel_err(ours, theirs) <= torch.finfo(torch.float32).eps * 8


def test_the_expert_search_is_refused_what_it_cannot_do(case):
    pipe, prompts = case.pipe, case.prompts
    with pytest.raises(OptimalStepsError, match="high_steps must be between 1 and 3"):
        od.search_pipeline(pipe, prompts, steps=4, teacher_steps=16, high_steps=4, **CALL)
    with pytest.raises(OptimalStepsError, match="plain DP"):
        od.search_pipeline(pipe, prompts, steps=4, teacher_steps=16, method="validated", **CALL)
    with pytest.raises(OptimalStepsError, match="too few points"):
        od.search_pipeline(pipe, prompts, steps=4, teacher_steps=5, high_steps=3, **CALL)


def test_a_two_expert_schedule_needs_its_boundary(case):
    pipe, prompts = case.pipe, case.prompts
    result = od.search_pipeline(pipe, prompts, steps=3, teacher_steps=12, seed=0, **CALL)
    moved = copy.deepcopy(result.schedule)
    moved.times[result.split_step] += 0.01
    with pytest.raises(OptimalStepsError, match="no step exactly on the experts' boundary"):
        od.sample_pipeline(pipe, prompts, moved, generator=gen(0), **CALL)
    other = copy.deepcopy(result.schedule)
    other.metadata["boundary"] = 0.9
    with pytest.raises(OptimalStepsError, match="not this pipeline's"):
        od.sample_pipeline(pipe, prompts, other, generator=gen(0), **CALL)


def test_wan22_with_its_unipc_scheduler_routes_by_integer_timesteps():
    """Wan's own scheduler (UniPC on flow sigmas) hands the networks integer timesteps: the boundary's is
    truncated as every time's is, and each expert still runs only its own steps."""
    case = tiny.wan22()
    pipe, prompts = case.pipe, case.prompts
    pipe.scheduler = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=5.0)
    result = od.search_pipeline(pipe, prompts, steps=4, teacher_steps=16, seed=0, solver="unipc", **CALL)
    assert result.schedule.times.tolist()[result.split_step] == BOUNDARY
    high, low = Timesteps(pipe.transformer), Timesteps(pipe.transformer_2)
    ours = od.sample_pipeline(pipe, prompts, result.schedule, generator=gen(5), solver="unipc", **CALL)
    assert len(high.seen) == 2 * result.split_step and len(low.seen) == 2 * (4 - result.split_step)
    assert min(high.seen) > max(low.seen)
    assert rel_err(ours, hand_run(pipe, prompts, result.schedule, "unipc", seed=5)) <= torch.finfo(torch.float32).eps * 8


def tiny_wan_vae():
    """A tiny Wan VAE (4 latent channels, per-channel statistics) for decoding in compare_pipeline."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                      temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                      latents_std=[1.5, 0.8, 1.0, 2.0], scale_factor_temporal=2,
                                      scale_factor_spatial=2).eval()


@pytest.mark.parametrize("name", ["uniform", "karras", "shift", "kl-optimal"])
@pytest.mark.parametrize("steps", [2, 3, 6])
def test_a_named_schedule_is_put_onto_the_boundary_by_its_nearest_point(name, steps):
    schedule = make_schedule(name, "flow", steps)
    times = schedule.times.tolist()
    moved = od.onto_boundary(schedule, BOUNDARY)
    after = moved.times.tolist()
    nearest = min(range(1, steps), key=lambda i: abs(times[i] - BOUNDARY))
    assert after[nearest] == BOUNDARY and after[:nearest] + after[nearest + 1:] == times[:nearest] + times[nearest + 1:]
    assert moved.metadata["boundary_moved"] == {"step": nearest, "from": times[nearest]}
    assert moved.metadata["split_step"] == nearest and moved.metadata["experts"] == [1] * nearest + [2] * (steps - nearest)
    assert schedule.times.tolist() == times and "boundary" not in schedule.metadata  # the given one is kept
    again = od.onto_boundary(moved, BOUNDARY)
    assert again.times.tolist() == after and again.metadata["boundary_moved"] == moved.metadata["boundary_moved"]


def test_onto_boundary_keeps_a_point_already_there_and_refuses_one_step():
    times = [1.0, 0.95, BOUNDARY, 0.4, 0.0]
    kept = od.onto_boundary(Schedule(torch.tensor(times, dtype=torch.float64), "flow"), BOUNDARY)
    assert kept.times.tolist() == times and "boundary_moved" not in kept.metadata and kept.metadata["split_step"] == 2
    with pytest.raises(OptimalStepsError, match="one step"):
        od.onto_boundary(make_schedule("uniform", "flow", 1), BOUNDARY)
    other = od.onto_boundary(make_schedule("uniform", "flow", 3), 0.9)  # made for another pipeline's boundary
    with pytest.raises(OptimalStepsError, match="not this pipeline's"):
        od.onto_boundary(other, BOUNDARY)


def test_sample_pipeline_runs_a_baseline_put_onto_the_boundary_each_expert_on_its_own_side(case):
    pipe, prompts = case.pipe, case.prompts
    moved = od.onto_boundary(make_schedule("uniform", "flow", 3), BOUNDARY)
    high, low = Timesteps(pipe.transformer), Timesteps(pipe.transformer_2)
    try:
        ours = od.sample_pipeline(pipe, prompts, moved, generator=gen(2), **CALL)
    finally:
        high.handle.remove()
        low.handle.remove()
    edge = BOUNDARY * 1000
    split = moved.metadata["split_step"]
    assert len(high.seen) == 2 * split and len(low.seen) == 2 * (3 - split)  # CFG: two calls a step
    assert min(high.seen) > edge and max(low.seen) == edge
    assert rel_err(ours, hand_run(pipe, prompts, moved, "euler", seed=2)) <= torch.finfo(torch.float32).eps * 8


def test_expert_schedules_search_oss_with_high_steps_and_move_the_baselines(case):
    inputs = od.pipeline_inputs(case.pipe, case.prompts, **CALL)
    model = inputs.model
    noise = sampler_noise(case.pipe, draw_latents(case.pipe, inputs, gen(0)), model.process, 1.0)
    made = od.expert_schedules("oss", model.process, [3, 4], model=model, noise=noise, cond=inputs.cond,
                               teacher_steps=16, high_steps=2)
    for m, schedule in made.items():
        assert schedule.metadata["split_step"] == 2 and schedule.times.tolist()[2] == BOUNDARY
        assert schedule.steps == check_steps(m) and BOUNDARY in schedule.metadata["high_sigmas"]
    uniform = od.expert_schedules("uniform", model.process, [3], model=model)[3]
    assert uniform.metadata["boundary_moved"]["step"] == 1 and uniform.times.tolist()[1] == BOUNDARY
    with pytest.raises(OptimalStepsError, match="not with a two-expert pipeline"):
        od.expert_schedules("oss", model.process, [3], model=model, noise=noise, cond=inputs.cond, refine=True)
    with pytest.raises(OptimalStepsError, match="has no option"):
        od.expert_schedules("oss", model.process, [3], model=model, noise=noise, cond=inputs.cond, refined=True)
    one = od.pipeline_inputs(tiny.wan21().pipe, case.prompts, height=32, width=32, num_frames=5).model
    with pytest.raises(OptimalStepsError, match="two experts"):
        od.expert_schedules("uniform", one.process, [3], model=one)


def test_compare_pipeline_puts_every_schedule_onto_the_boundary():
    case = tiny.wan22()
    pipe, prompts = case.pipe, case.prompts
    pipe.vae = tiny_wan_vae()  # for decoding only: no search or sampler reads it
    searched = od.search_pipeline(pipe, prompts, steps=3, teacher_steps=12, seed=0, **CALL).schedule
    uniform = make_schedule("uniform", "flow", 3)
    result = compare_pipeline(pipe, prompts, {"oss": searched, "uniform": uniform}, teacher_steps=12, seed=1,
                              metrics=ImageMetrics(), **CALL)
    oss, moved = result.rows
    assert oss["boundary_moved"] is None and moved["boundary_moved"] == {"step": 1, "from": uniform.times[1].item()}
    teacher = od.sample_pipeline(pipe, prompts, od.pipeline_teacher(pipe, 12, 32, 32), generator=gen(1), **CALL)
    for row, schedule in ((oss, searched), (moved, od.onto_boundary(uniform, BOUNDARY))):
        latents = od.sample_pipeline(pipe, prompts, schedule, generator=gen(1), **CALL)
        assert row["latent_mse"] == pytest.approx(mse(latents, teacher), rel=torch.finfo(torch.float32).eps * 64)
    # the same baseline run as given (the pipeline's own rule, a step across the boundary) is another run
    across = od.sample_pipeline(pipe, prompts, uniform, generator=gen(1), **CALL)
    assert mse(across, teacher) != pytest.approx(moved["latent_mse"], rel=1e-3)
