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
from optimalsteps.core.solvers import initial_state, solver_step  # noqa: E402
from optimalsteps.integrations import diffusers as od  # noqa: E402
from optimalsteps.integrations.diffusers import tiny  # noqa: E402
from optimalsteps.integrations.diffusers.run import draw_latents, sampler_noise  # noqa: E402

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
