import math

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, sample, search
from optimalsteps.core.schedules import Schedule
from optimalsteps.core.solvers import nfe_per_trajectory
from optimalsteps.optimize.dp import choose_path, median_candidates, median_path
from optimalsteps.optimize.objectives import OBJECTIVES, aggregate, per_sample_error
from optimalsteps.optimize.options import DPOptions

EPS = torch.finfo(torch.float64).eps


def test_each_objective_is_its_formula():
    errors = torch.tensor([1e-4, 4e-4, 1e-2, 2.0, 3e-3, 5e-5, 7e-4, 1e-3, 2e-3, 9e-4, 1.0], dtype=torch.float64)
    assert float(aggregate(errors, "mse")) == pytest.approx(float(errors.sum()) / len(errors), rel=100 * EPS)
    assert float(aggregate(errors, "log")) == pytest.approx(sum(math.log(e) for e in errors.tolist()) / len(errors),
                                                            rel=100 * EPS)
    # the worst tenth of 11 samples is the 2 largest errors
    assert float(aggregate(errors, "tail")) == pytest.approx(math.log((2.0 + 1.0) / 2), rel=100 * EPS)


def test_objectives_score_leading_dimensions_separately():
    errors = torch.rand(3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    for name in OBJECTIVES:
        scores = aggregate(errors, name)
        assert scores.shape == (3, 5)
        assert float(scores[1, 2]) == float(aggregate(errors[1, 2], name))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_grows_with_the_worst_sample(name):
    errors = torch.tensor([1e-3, 2e-3, 3e-3, 4e-3], dtype=torch.float64)
    worse = errors.clone()
    worse[3] = 1.0
    assert float(aggregate(worse, name)) > float(aggregate(errors, name))


def test_log_prefers_typical_fidelity_and_mse_prefers_blur():
    # a schedule exact on 15 samples but switching mode on one, against one mediocre on every sample
    sharp = torch.tensor([1e-6] * 15 + [1.0], dtype=torch.float64)
    blur = torch.full((16,), 0.05, dtype=torch.float64)
    assert float(aggregate(sharp, "mse")) > float(aggregate(blur, "mse"))
    assert float(aggregate(sharp, "log")) < float(aggregate(blur, "log"))
    assert float(aggregate(sharp, "tail")) > float(aggregate(blur, "tail"))


def test_exact_matches_stay_finite():
    assert math.isfinite(float(aggregate(torch.zeros(4, dtype=torch.float64), "log")))


def test_per_sample_error_over_sample_dimensions():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)  # [P, B, 2, 2]
    ref = torch.zeros(3, 2, 2)
    got = per_sample_error(x, ref)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    assert float(got[1, 2]) == float((x[1, 2].double() ** 2).mean())


def test_unknown_objective_is_named():
    with pytest.raises(OptimalStepsError, match="unknown objective 'psnr'; known: mse, log, tail"):
        aggregate(torch.ones(3), "psnr")


# ------------------------------------------------------------------------ the DP's median mode


def test_median_mode_chooses_by_the_objective_of_the_per_sample_errors():
    per_sample = [[0, 2, 5, 9], [0, 4, 6, 9], [0, 3, 7, 9]]
    # the per-position median first, then each distinct per-sample path
    assert median_candidates(per_sample) == [[0, 3, 6, 9], [0, 2, 5, 9], [0, 4, 6, 9], [0, 3, 7, 9]]
    assert median_candidates([[0, 3, 9]] * 3) == [[0, 3, 9]]
    # a candidate exact on 15 samples but switching mode on one, against one mediocre on every sample
    sharp = [1e-6] * 15 + [1.0]
    blur = [0.05] * 16
    errors = torch.tensor([blur, sharp], dtype=torch.float64)
    assert choose_path(errors, "mse") == 0 and choose_path(errors, "log") == 1
    assert choose_path(torch.tensor([blur, blur], dtype=torch.float64), "log") == 0  # ties keep the median


def _median_search(model, noise, objective):
    return search(model, noise, steps=3, teacher_steps=24, solver="dpmpp2m",
                  dp=DPOptions(aggregate="median", objective=objective), method="dp")


def test_median_search_with_an_objective_is_the_brute_force_choice_and_log_differs_from_mse():
    model = GaussianMixture.random(dim=6, components=3, seed=4, process="flow")
    noise = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plain = _median_search(model, noise, None)
    assert plain.indices == median_path(plain.per_sample_indices) and "median_choice" not in plain.schedule.metadata
    chosen = {}
    for objective in ("mse", "log"):
        result = _median_search(model, noise, objective)
        assert result.per_sample_indices == plain.per_sample_indices  # a per-sample DP: the objective cannot move it
        # brute force from the definition: the median and every per-sample path, scored on the search samples
        paths = [plain.indices] + [p for i, p in enumerate(plain.per_sample_indices)
                                   if p != plain.indices and p not in plain.per_sample_indices[:i]]
        teacher = result.teacher.times
        scores = [float(aggregate(per_sample_error(sample(model, noise, Schedule(teacher[p], model.process),
                                                          "dpmpp2m").samples, result.teacher_samples), objective))
                  for p in paths]
        assert result.indices == paths[scores.index(min(scores))]
        meta = result.schedule.metadata
        assert meta["objective"] == objective and meta["median_choice"]["candidates"] == paths
        assert meta["median_choice"]["scores"] == pytest.approx(scores, rel=1e3 * EPS, abs=1e3 * EPS)
        assert min(scores) <= scores[0]  # never worse on its objective than the paper's median path
        extra = len(paths) * nfe_per_trajectory("dpmpp2m", 3) * noise.shape[0]
        assert result.nfe == plain.nfe + extra and meta["median_choice"]["nfe"] == extra
        chosen[objective] = (result.indices, dict(zip(map(tuple, paths), scores)))
    # on this mixture the two objectives pick different paths: each is strictly better on its own objective
    assert chosen["mse"][0] != chosen["log"][0]
    log_scores = chosen["log"][1]
    assert log_scores[tuple(chosen["log"][0])] < log_scores[tuple(chosen["mse"][0])]


def test_median_mode_refuses_a_beam_width():
    model = GaussianMixture.random(dim=4, components=2, seed=0, process="flow")
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(OptimalStepsError, match="does not take aggregate"):
        search(model, noise, steps=2, teacher_steps=8, dp=DPOptions(aggregate="median", objective="log", width=2),
               method="dp")


def test_cli_median_with_an_objective(tmp_path, capsys):
    import json

    from optimalsteps.cli import main

    out = tmp_path / "m.json"
    code = main(["search", "--model", "gmm:dim=4,components=2", "--samples", "3", "--steps", "2", "--teacher-steps",
                 "10", "--aggregate", "median", "--objective", "log", "--out", str(out)])
    assert code == 0
    meta = json.loads(out.read_text())["metadata"]
    assert meta["aggregate"] == "median" and meta["objective"] == "log"
    assert meta["teacher_indices"] in meta["median_choice"]["candidates"]
