import functools
import json
import math
import warnings

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, Schedule, sample
from optimalsteps import search as any_search
from optimalsteps.cli import main
from optimalsteps.optimize.coarse import CoarseToFine, level_strides
from optimalsteps.optimize.objectives import aggregate, per_sample_error
from optimalsteps.optimize.refine import Refinement, final_error, from_unit, refine_schedule, to_unit
from optimalsteps.optimize.options import DPOptions
from optimalsteps.optimize.search import coarse_to_fine_search
from optimalsteps.core.schedules import karras, logsnr, uniform
from optimalsteps.core.solvers import nfe_per_trajectory

# these tests check the paper's plain DP: they call it by name
search = functools.partial(any_search, method="dp")


def _model(process="flow", dim=6, seed=4):
    return GaussianMixture.random(dim=dim, components=3, seed=seed, process=process)


def _noise(count=4, dim=6, seed=1):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _error(model, noise, schedule, solver, target):
    return (sample(model, noise, schedule, solver=solver).samples - target).pow(2).mean().item()


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_unit_coordinate_round_trip_and_order(process):
    model = _model(process)
    times = karras(model.process, 7).times
    first, last = float(times[0]), float(times[-1])
    unit = to_unit(model.process, times, first, last)
    assert unit[0] == pytest.approx(0.0, abs=1e-12) and unit[-1] == pytest.approx(1.0, abs=1e-12)
    assert bool((torch.diff(unit) > 0).all())
    back = from_unit(model.process, unit[1:-1], first, last)
    assert torch.allclose(back, times[1:-1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun"])
@pytest.mark.parametrize("method", ["nelder-mead", "coordinate"])
def test_refinement_never_worse_than_its_start_and_stays_a_schedule(process, solver, method):
    model = _model(process)
    noise = _noise()
    target = model.exact_solution(noise, rtol=1e-8, atol=1e-8)
    starts = {"uniform": uniform(model.process, 4), "logsnr": logsnr(model.process, 4)}
    result = refine_schedule(model, noise, starts, solver, target, method=method, max_evaluations=40)
    errors = {name: _error(model, noise, s, solver, target) for name, s in starts.items()}
    assert result.start_errors == pytest.approx(errors, rel=1e-9)
    assert result.start == min(errors, key=errors.get)
    assert result.error_before == pytest.approx(errors["uniform"], rel=1e-9)
    # the reported error is the returned schedule's real error, and never above any start's
    assert _error(model, noise, result.schedule, solver, target) == pytest.approx(result.error_after, rel=1e-9)
    assert result.error_after <= min(errors.values())
    times = result.schedule.times
    assert len(times) == 5 and bool((torch.diff(times) < 0).all())
    assert float(times[0]) == model.process.t_start and float(times[-1]) == model.process.t_clean
    assert bool((times[1:-1] > model.process.t_clean).all() and (times[1:-1] < model.process.t_start).all())
    assert result.evaluations <= 40
    assert result.nfe == result.evaluations * noise.shape[0] * nfe_per_trajectory(solver, 4)


def test_refinement_gains_where_the_grid_search_is_not_the_optimum():
    # DPM-Solver++(2M) carries history: the grid DP's choice is not its best final error
    model = _model("flow", dim=8, seed=0)
    noise = _noise(8, 8, seed=2)
    dp = search(model, noise, steps=5, teacher_steps=40, solver="dpmpp2m")
    result = refine_schedule(model, noise, dp.schedule, "dpmpp2m", dp.teacher_samples)
    assert result.stopped in ("converged", "evaluations")
    assert result.error_after < 0.5 * result.error_before
    assert result.error_before == pytest.approx(dp.dp_cost, rel=1e-6)
    assert result.history[0][1] == result.error_before
    assert all(b[1] < a[1] and b[0] > a[0] for a, b in zip(result.history, result.history[1:]))


def test_budget_is_respected_and_a_too_small_budget_is_refused():
    model = _model("vp")
    noise = _noise()
    target = model.exact_solution(noise, rtol=1e-8, atol=1e-8)
    start = uniform(model.process, 5)
    per_evaluation = noise.shape[0] * 5
    result = refine_schedule(model, noise, start, "euler", target, budget_nfe=30 * per_evaluation + 3)
    assert result.stopped in ("budget", "converged")
    assert result.nfe <= 30 * per_evaluation + 3
    with pytest.warns(UserWarning, match="budget of 40 model calls is below"):
        refused = refine_schedule(model, noise, start, "euler", target, budget_nfe=40)
    assert refused.refused and refused.nfe == 0 and refused.schedule is start
    assert "finish one pass" in refused.message


def test_discrete_timestep_model_is_refused_but_search_still_returns_the_schedule(tmp_path):
    model = _model("vp")
    model.discrete_timesteps = True
    noise = _noise()
    plain = search(model, noise, steps=3, teacher_steps=20)
    with pytest.warns(UserWarning, match="discrete timesteps"):
        result = search(model, noise, steps=3, teacher_steps=20, refine=True)
    assert torch.equal(result.schedule.times, plain.schedule.times)
    assert result.refinement.refused
    assert "discrete timesteps" in result.schedule.metadata["refine"]["message"]
    assert result.schedule.metadata["refine_nfe"] == 0
    path = result.schedule.save(tmp_path / "s.json")
    assert Schedule.load(path).metadata["refine"]["stopped"] == "refused"


def test_search_with_refinement_records_both_nfe_counts_and_beats_every_start():
    model = _model("flow", dim=8, seed=0)
    noise = _noise(6, 8, seed=3)
    plain = search(model, noise, steps=3, teacher_steps=30, solver="dpmpp2m")
    result = search(model, noise, steps=3, teacher_steps=30, solver="dpmpp2m", refine=True)
    meta = result.schedule.metadata
    assert meta["search_nfe"] == plain.nfe
    assert meta["nfe"] == result.nfe == meta["search_nfe"] + meta["refine_nfe"]
    assert meta["refine_nfe"] >= result.refinement.nfe > 0
    assert meta["method"] == "oss-refined"
    starts = result.refinement.start_errors
    assert {"oss", "uniform", "karras", "gits", "boss", "dm"} <= set(starts)
    assert starts["oss"] == pytest.approx(plain.dp_cost, rel=1e-6)
    realised = final_error(model, noise, result.schedule, "dpmpp2m", plain.teacher_samples)[0]
    assert realised == pytest.approx(result.refinement.error_after, rel=1e-9)
    assert realised <= min(starts.values())
    assert len(meta["calibration"]["q05"]) == 3  # the teacher's amplitudes at the refined times


def test_extra_refinement_samples_run_their_own_teacher():
    model = _model("flow", dim=8, seed=0)
    noise = _noise(4, 8, seed=3)
    options = Refinement(samples=10, baselines=False, max_evaluations=20)
    result = search(model, noise, steps=3, teacher_steps=30, solver="euler", refine=options)
    refine = result.schedule.metadata["refine"]
    assert refine["samples"] == 10
    # 6 extra teacher runs of 30 steps, then 20 evaluations (the start included) of 10 samples x 3 steps
    assert result.schedule.metadata["refine_nfe"] == 6 * 30 + 20 * 10 * 3
    with pytest.raises(OptimalStepsError, match="at least the search samples"):
        search(model, noise, steps=3, teacher_steps=30, refine=Refinement(samples=2))


def test_search_refuses_a_too_small_budget_and_keeps_the_unrefined_schedule():
    model = _model("flow")
    noise = _noise()
    plain = search(model, noise, steps=3, teacher_steps=20)
    with pytest.warns(UserWarning, match="refinement budget of 10 model calls"):
        result = search(model, noise, steps=3, teacher_steps=20, refine=Refinement(baselines=False), refine_budget=10)
    assert torch.equal(result.schedule.times, plain.schedule.times)
    assert result.schedule.metadata["refine"]["stopped"] == "refused"
    assert result.schedule.metadata["teacher_indices"] == plain.indices


def test_bad_refinement_input_is_named():
    model = _model()
    noise = _noise()
    target = torch.zeros_like(noise)
    with pytest.raises(OptimalStepsError, match="unknown refinement method"):
        refine_schedule(model, noise, uniform(model.process, 3), "euler", target, method="adam")
    with pytest.raises(OptimalStepsError, match="target must match"):
        refine_schedule(model, noise, uniform(model.process, 3), "euler", target[:2])
    with pytest.raises(OptimalStepsError, match="expected 3 steps"):
        refine_schedule(model, noise, [uniform(model.process, 3), uniform(model.process, 4)], "euler", target)
    with pytest.raises(OptimalStepsError, match="budget must be a whole number"):
        refine_schedule(model, noise, uniform(model.process, 3), "euler", target, budget_nfe=0)
    with pytest.raises(OptimalStepsError, match="reference-compat"):
        search(model, noise, steps=3, teacher_steps=20, dp=DPOptions(reference_compat=True), refine=True)


# ---------------------------------------------------------------------------------- coarse to fine


def test_level_strides_end_on_the_teacher_grid():
    assert level_strides(200, 13, 4) == [3, 1]
    assert level_strides(200, 25, 8) == [1]
    assert level_strides(40, 40, 4) == []


@pytest.mark.parametrize("process,solver", [("flow", "euler"), ("vp", "dpmpp2m"), ("ve", "euler"),
                                            ("flow", "heun")])
def test_coarse_to_fine_is_close_to_the_full_search_for_fewer_calls(process, solver):
    model = _model(process, dim=8, seed=0)
    noise = _noise(4, 8, seed=5)
    full = search(model, noise, steps=3, teacher_steps=48, solver=solver)
    fast = search(model, noise, steps=3, teacher_steps=48, solver=solver,
                  dp=DPOptions(coarse_to_fine=CoarseToFine(coarse_steps=8)))
    path = fast.indices
    assert len(path) == 4 and path[0] == 0 and path[-1] == 48 and all(b > a for a, b in zip(path, path[1:]))
    assert torch.equal(fast.schedule.times, full.teacher.times[path])
    # the recorded cost is the traced schedule's real final error, and close to the full search's
    realised = final_error(model, noise, fast.schedule, solver, fast.teacher_samples)[0]
    assert realised == pytest.approx(fast.dp_cost, rel=1e-6)
    assert fast.dp_cost <= 1.1 * full.dp_cost
    assert fast.nfe < 0.7 * full.nfe
    assert fast.teacher_nfe == full.teacher_nfe
    info = fast.schedule.metadata["coarse_to_fine"]
    assert fast.nfe == fast.teacher_nfe + sum(info["nfe"])


def test_coarse_to_fine_without_a_coarser_grid_is_the_full_search():
    model = _model("vp", dim=6)
    noise = _noise()
    full = search(model, noise, steps=3, teacher_steps=12, solver="dpmpp2m")
    same = coarse_to_fine_search(model, noise, 3, teacher_steps=12, solver="dpmpp2m", coarse_steps=12)
    assert same.indices == full.indices and same.nfe == full.nfe and same.dp_cost == pytest.approx(full.dp_cost)


def test_coarse_to_fine_with_median_aggregation():
    model = _model("flow", dim=6)
    noise = _noise(3)
    fast = search(model, noise, steps=3, teacher_steps=40, dp=DPOptions(aggregate="median", coarse_to_fine=True))
    assert len(fast.per_sample_indices) == 3
    for path in fast.per_sample_indices:
        realised = final_error(model, noise[:1], fast.teacher.times[path], "euler", fast.teacher_samples[:1])[0]
        assert math.isfinite(realised)
        assert all(b > a for a, b in zip(path, path[1:]))


def test_bad_coarse_to_fine_options_are_named():
    model = _model()
    noise = _noise()
    with pytest.raises(OptimalStepsError, match="coarse_steps must be a whole number >= 4"):
        search(model, noise, steps=3, teacher_steps=40, dp=DPOptions(coarse_to_fine=CoarseToFine(coarse_steps=3)))
    with pytest.raises(OptimalStepsError, match="factor"):
        search(model, noise, steps=3, teacher_steps=40, dp=DPOptions(coarse_to_fine=CoarseToFine(factor=1)))


# ---------------------------------------------------------------------------------------- CLI


def test_cli_refine_saves_the_unrefined_schedule_when_the_budget_is_too_small(tmp_path, capsys):
    out = tmp_path / "s.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI reports the refusal itself, as one line
        code = main(["search", "--model", "gmm:dim=4,components=2", "--steps", "3", "--teacher-steps", "20",
                     "--samples", "2", "--refine", "--refine-budget", "5", "--coarse-to-fine", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "refinement skipped: refinement budget of 5 model calls is below" in text
    assert "coarse to fine:" in text
    metadata = json.loads(out.read_text())["metadata"]
    assert metadata["refine"]["stopped"] == "refused" and metadata["coarse_to_fine"]["coarse_steps"] == 6


def test_cli_refine_options_need_refine(tmp_path, capsys):
    code = main(["search", "--model", "gmm:dim=4,components=2", "--steps", "3", "--teacher-steps", "20",
                 "--refine-budget", "500", "--out", str(tmp_path / "s.json")])
    assert code == 2
    assert "--refine-budget, --refine-samples and --refine-objective need --refine" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    code = main(["search", "--model", "gmm:dim=4,components=2", "--steps", "3", "--teacher-steps", "20",
                 "--refine-objective", "log", "--out", str(tmp_path / "s.json")])
    assert code == 2 and "--refine-objective need --refine" in capsys.readouterr().err


def _log_objective(model, noise, schedule, solver, target):
    out = sample(model, noise, schedule, solver=solver).samples
    return float(aggregate(per_sample_error(out, target), "log"))


@pytest.mark.parametrize("method", ["nelder-mead", "coordinate"])
def test_refinement_on_the_log_objective_lowers_it_on_its_samples(method):
    # 4 DPM-Solver++(2M) steps: here refining the mean squared error raises the log objective above the DP's,
    # refining the log objective lowers it; each refinement wins on its own objective
    model = _model("flow", dim=8, seed=0)
    noise = _noise(8, 8, seed=2)
    dp = search(model, noise, steps=4, teacher_steps=40, solver="dpmpp2m")
    target = dp.teacher_samples
    by_log = refine_schedule(model, noise, dp.schedule, "dpmpp2m", target, method=method, max_evaluations=60,
                             objective="log")
    by_mse = refine_schedule(model, noise, dp.schedule, "dpmpp2m", target, method=method, max_evaluations=60)
    before = _log_objective(model, noise, dp.schedule, "dpmpp2m", target)
    after = _log_objective(model, noise, by_log.schedule, "dpmpp2m", target)
    eps = torch.finfo(torch.float64).eps
    # the reported values are the log objective (mean log per-sample error), realised by the schedules
    assert by_log.error_before == pytest.approx(before, rel=1e3 * eps)
    assert by_log.error_after == pytest.approx(after, rel=1e3 * eps)
    assert by_log.history[-1][1] == by_log.error_after
    assert after < before
    assert after < _log_objective(model, noise, by_mse.schedule, "dpmpp2m", target)
    assert by_mse.error_after < _error(model, noise, by_log.schedule, "dpmpp2m", target)


def test_refinement_on_the_tail_objective_reports_its_realised_value():
    model = _model("vp", dim=6)
    noise = _noise(10, 6, seed=3)
    target = model.exact_solution(noise, rtol=1e-8, atol=1e-8)
    start = uniform(model.process, 3)
    result = refine_schedule(model, noise, start, "euler", target, max_evaluations=15, objective="tail")
    out = sample(model, noise, result.schedule, solver="euler").samples
    realised = float(aggregate(per_sample_error(out, target), "tail"))  # log of the worst tenth: the worst sample
    assert result.error_after == pytest.approx(realised, rel=1e3 * torch.finfo(torch.float64).eps)
    assert result.error_after <= result.error_before


def test_refinement_objective_default_is_mse_and_unknown_ones_are_named():
    model = _model("flow", dim=4)
    noise = _noise(4, 4)
    target = model.exact_solution(noise, rtol=1e-8, atol=1e-8)
    start = uniform(model.process, 3)
    plain = refine_schedule(model, noise, start, "euler", target, max_evaluations=12)
    explicit = refine_schedule(model, noise, start, "euler", target, max_evaluations=12, objective="mse")
    assert torch.equal(plain.schedule.times, explicit.schedule.times) and plain.error_after == explicit.error_after
    assert plain.error_before == pytest.approx(_error(model, noise, start, "euler", target), rel=1e-9)
    assert Refinement().objective == "mse"
    with pytest.raises(OptimalStepsError, match="unknown objective 'psnr'"):
        Refinement(objective="psnr")
    with pytest.raises(OptimalStepsError, match="unknown objective 'psnr'"):
        refine_schedule(model, noise, start, "euler", target, objective="psnr")


def test_cli_refine_objective_reaches_the_refinement(tmp_path, capsys):
    out = tmp_path / "s.json"
    code = main(["search", "--model", "gmm:dim=4,components=2", "--samples", "3", "--steps", "3",
                 "--teacher-steps", "20", "--solver", "dpmpp2m", "--refine", "--refine-objective", "log",
                 "--refine-budget", "2000", "--out", str(out)])
    assert code == 0
    assert "final error (log) on 3 samples" in capsys.readouterr().out
    refine = json.loads(out.read_text())["metadata"]["refine"]
    assert refine["objective"] == "log" and refine["error_refined"] <= refine["error_start"]


def test_compare_names_the_refined_and_fast_searches():
    from optimalsteps.evaluation.compare import compare

    model = _model("flow", dim=4)
    result = compare(model, steps=[3], solvers=["dpmpp2m"], schedules=["oss", "oss-refined", "oss-fast"], samples=3,
                     eval_samples=16, teacher_steps=20,
                     options={"oss-refined": {"refine": Refinement(baselines=False)}})
    rows = {r["schedule"]: r for r in result.rows}
    assert set(rows) == {"oss", "oss-refined", "oss-fast"}
    assert rows["oss-refined"]["times"] != rows["oss"]["times"]
    assert all(r["nfe"] == 3 for r in rows.values())
