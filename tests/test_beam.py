import functools
import itertools

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, Schedule, sample
from optimalsteps import search as any_search
from optimalsteps.optimize.beam import beam_dp, beam_model_calls
from optimalsteps.optimize.objectives import aggregate, per_sample_error
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.teacher import run_teacher

plain_dp = functools.partial(any_search, method="dp")
TOL = torch.finfo(torch.float64).eps * 1e6  # float64 throughout; sums of a few hundred terms


def _setup(process, solver, n=10, samples=5, dim=6, seed=1):
    model = GaussianMixture.random(dim=dim, components=3, seed=seed, process=process)
    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    teacher = default_teacher_grid(model.process, n)
    return model, noise, teacher, run_teacher(model, noise, teacher, solver)


def _every_schedule(model, noise, teacher, run, steps, solver, objective, free_start=False):
    """Every schedule on the grid, sampled by the library's own sampler: {indices: score}."""
    n = teacher.steps
    starts = range(n - steps + 1) if free_start else [0]
    scores = {}
    for first in starts:
        for middle in itertools.combinations(range(first + 1, n), steps - 1):
            indices = (first, *middle, n)
            metadata = {"noise_scale_time": float(teacher.times[0])} if first else {}
            out = sample(model, noise, Schedule(teacher.times[list(indices)], model.process, metadata=metadata),
                         solver).samples
            scores[indices] = float(aggregate(per_sample_error(out, run.states[:, -1]), objective))
    return scores


def _brute_force(model, noise, teacher, run, steps, solver, objective, free_start=False):
    """(best score, its indices) over every schedule on the grid (ties: the first in enumeration order)."""
    scores = _every_schedule(model, noise, teacher, run, steps, solver, objective, free_start)
    best = min(scores, key=scores.get)
    return scores[best], list(best)


@pytest.mark.parametrize("process", ["flow", "vp"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun", "unipc"])
@pytest.mark.parametrize("objective", ["mse", "log"])
def test_wide_beam_is_the_brute_force_optimum(process, solver, objective):
    model, noise, teacher, run = _setup(process, solver)
    best_score, best_indices = _brute_force(model, noise, teacher, run, 4, solver, objective)
    wide = beam_dp(model, run.states, teacher.times, 4, solver, objective, width=84, candidates=84)
    assert wide.score == pytest.approx(best_score, rel=TOL, abs=TOL)
    # the score it reports is what the sampler realises on its schedule
    out = sample(model, noise, Schedule(teacher.times[wide.indices], model.process), solver).samples
    assert float(aggregate(per_sample_error(out, run.states[:, -1]), objective)) == pytest.approx(
        wide.score, rel=TOL, abs=TOL)


@pytest.mark.parametrize("solver", ["dpmpp2m", "unipc"])
def test_free_start_wide_beam_is_the_brute_force_optimum(solver):
    model, noise, teacher, run = _setup("flow", solver)
    best_score, _ = _brute_force(model, noise, teacher, run, 3, solver, "log", free_start=True)
    wide = beam_dp(model, run.states, teacher.times, 3, solver, "log", width=200, free_start=True)
    assert wide.score == pytest.approx(best_score, rel=TOL, abs=TOL)


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_unipc_beam_scores_every_schedule_as_the_sampler_does(process):
    # the beam carries UniPC's whole state (previous estimate and time, the pending UniC correction): with
    # a width holding every path, each complete schedule's score is the one `sample` realises on it
    model, noise, teacher, run = _setup(process, "unipc")
    every = _every_schedule(model, noise, teacher, run, 4, "unipc", "mse")
    wide = beam_dp(model, run.states, teacher.times, 4, "unipc", "mse", width=84)
    assert len(wide.finalists) == len(every) == 84
    for indices, score in wide.finalists:
        assert score == pytest.approx(every[tuple(indices)], rel=TOL, abs=TOL), indices


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun", "unipc"])
def test_width_one_is_the_plain_dp(process, solver):
    model, noise, teacher, run = _setup(process, solver, n=16, samples=4)
    plain = plain_dp(model, noise, steps=4, teacher_steps=16, solver=solver)
    narrow = beam_dp(model, run.states, teacher.times, 4, solver, "mse", width=1)
    assert narrow.indices == plain.indices
    assert narrow.score == pytest.approx(plain.dp_cost, rel=1e-9)
    spent = narrow.nfe + run.nfe * noise.shape[0]
    # Heun: the plain DP also corrects candidates that cannot reach a cell (and then drops them); the beam does not
    assert spent == plain.nfe if solver != "heun" else spent <= plain.nfe


@pytest.mark.parametrize("solver", ["dpmpp2m", "unipc"])
def test_narrow_beams_never_beat_the_exhaustive_one(solver):
    model, noise, teacher, run = _setup("flow", solver, n=14, seed=3)
    scores = [beam_dp(model, run.states, teacher.times, 4, solver, "log", width=w).score for w in (1, 2, 8, 286)]
    # C(13, 3) = 286 paths reach the busiest cell: the widest beam enumerates every schedule
    assert scores[-1] <= min(scores) + TOL
    assert scores[-1] < scores[0]  # and the single-state DP is not the optimum here


@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun", "unipc"])
@pytest.mark.parametrize("width,free_start", [(1, False), (3, False), (2, True)])
def test_model_call_count(solver, width, free_start):
    model, noise, teacher, run = _setup("ve", solver, n=12, samples=3)
    result = beam_dp(model, run.states, teacher.times, 4, solver, "log", width=width, free_start=free_start)
    bound = beam_model_calls(13, 4, solver, width, free_start=free_start) * noise.shape[0]
    if solver == "heun":
        assert result.nfe <= bound
    else:
        assert result.nfe == bound


def test_sub_grid_schedules_stay_on_it():
    model, noise, teacher, run = _setup("flow", "euler", n=12)
    grid = [0, 3, 6, 9, 12]
    result = beam_dp(model, run.states, teacher.times, 3, "euler", "log", width=2, grid=grid)
    assert set(result.indices) <= set(grid) and result.indices[0] == 0 and result.indices[-1] == 12


@pytest.mark.parametrize("kwargs,message", [
    ({"width": 0}, "width and candidates must be whole numbers >= 1"),
    ({"objective": "psnr"}, "unknown objective 'psnr'"),
    ({"grid": [0, 4, 8]}, "must contain the teacher's first \\(0\\) and last \\(10\\) index"),
    ({"steps": 11}, "steps must be between 1 and the grid's 10 intervals"),
    ({"solver": "rk4"}, "unknown solver 'rk4'"),
])
def test_bad_input_is_named(kwargs, message):
    model, noise, teacher, run = _setup("flow", "euler")
    options = {"steps": 3, **kwargs}
    with pytest.raises(OptimalStepsError, match=message):
        beam_dp(model, run.states, teacher.times, **options)
