import math

import pytest
import torch

from optimalsteps import OptimalStepsError
from optimalsteps.optimize.objectives import OBJECTIVES, aggregate, per_sample_error

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
