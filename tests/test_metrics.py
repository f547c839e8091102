"""Metrics against hand-computed values and against POT."""

import math
import sys

import numpy as np
import pytest
import torch

from optimalsteps.core.errors import OptimalStepsError
from optimalsteps.evaluation.metrics import (frechet_distance, frechet_from_statistics, median_bandwidth, mixture_nll, mmd, mse,
                                  mse_per_sample, psnr, random_projections, sliced_wasserstein,
                                  sliced_wasserstein_numpy)
from optimalsteps.testbeds.mixture import GaussianMixture


def test_mse_and_psnr_by_hand():
    ref = torch.zeros(3, 2, 2)
    x = ref + 0.1
    assert mse(x, ref) == pytest.approx(0.01)
    np.testing.assert_allclose(mse_per_sample(x, ref).numpy(), [0.01] * 3)
    assert psnr(x, ref, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    # per-sample PSNRs are averaged: errors 0.1 and 1 give the mean of 20 and 0 dB for range 1
    two = torch.tensor([[0.1], [1.0]])
    assert psnr(two, torch.zeros(2, 1), data_range=1.0) == pytest.approx(10.0)
    assert math.isfinite(psnr(ref, ref, data_range=2.0))
    with pytest.raises(OptimalStepsError, match="differ in shape"):
        mse(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(OptimalStepsError, match="positive data range"):
        psnr(x, ref, data_range=0.0)


def test_mse_per_sample_is_the_searchs_per_sample_error_with_checks():
    from optimalsteps.optimize.objectives import per_sample_error

    gen = torch.Generator().manual_seed(0)
    x, ref = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)
    got = mse_per_sample(x, ref)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (4,)
    assert torch.equal(got, per_sample_error(x, ref))
    with pytest.raises(OptimalStepsError, match="differ in shape"):
        mse_per_sample(x, ref[:, :2])  # per_sample_error would broadcast nothing here, the metric refuses
    with pytest.raises(OptimalStepsError, match="metrics need samples"):
        mse_per_sample(torch.zeros(0, 3), torch.zeros(0, 3))


def test_sliced_wasserstein_in_one_dimension_is_w2():
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[1.0], [2.0], [3.0]])
    assert sliced_wasserstein(x, y) == pytest.approx(1.0)
    theta = random_projections(1, 7)
    assert sliced_wasserstein_numpy(x.numpy(), y.numpy(), theta) == pytest.approx(1.0)


def test_sliced_wasserstein_of_a_translation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    v = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    theta = random_projections(5, 64, seed=2)
    expected = math.sqrt(np.mean((theta.T @ v) ** 2))  # every projected point moves by theta . v
    assert sliced_wasserstein_numpy(x, x + v, theta) == pytest.approx(expected)


@pytest.mark.parametrize("sizes", [(50, 50), (50, 37)])
def test_numpy_fallback_matches_pot(sizes):
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sizes[0], 4))
    y = rng.standard_normal((sizes[1], 4)) * 1.5 + 0.3
    theta = random_projections(4, 32, seed=5)
    ours = sliced_wasserstein_numpy(x, y, theta)
    theirs = float(ot.sliced_wasserstein_distance(x, y, projections=theta, p=2))
    assert ours == pytest.approx(theirs, rel=1e-10)


def test_sliced_wasserstein_without_pot(monkeypatch):
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(30, 3, generator=torch.Generator().manual_seed(1)) + 1.0
    with_pot = sliced_wasserstein(x, y, projections=16, seed=3)
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` now fails
    assert sliced_wasserstein(x, y, projections=16, seed=3) == pytest.approx(with_pot, rel=1e-10)


def test_mmd_by_hand():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])
    a, b = math.exp(-0.5), math.exp(-2.0)  # kernel at distance 1 and 2, bandwidth 1
    expected = a + b - 2 * (1 + b + 2 * a) / 4
    assert mmd(x, y, bandwidth=1.0) == pytest.approx(expected)
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)


def test_mmd_tells_distributions_apart():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 2, generator=g)
    same = torch.randn(400, 2, generator=g)
    shifted = torch.randn(400, 2, generator=g) + 1.0
    assert abs(mmd(same, ref)) < 0.01
    assert mmd(shifted, ref) > 0.1
    assert sliced_wasserstein(shifted, ref) > 3 * sliced_wasserstein(same, ref)


def test_mixture_nll_of_a_standard_normal():
    normal = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # mean over samples of 0.5 |x|^2 + log(2 pi) in two dimensions
    assert mixture_nll(normal, x) == pytest.approx(0.5 + math.log(2 * math.pi))
    with pytest.raises(OptimalStepsError, match="exact log_prob"):
        mixture_nll(object(), x)


def test_frechet_distance_by_hand():
    # diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2 = 1 + 1 + 1
    value = frechet_from_statistics(np.array([0.0, 0.0]), np.diag([1.0, 4.0]), np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    assert value == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 3, generator=g)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats + 2.0, feats) == pytest.approx(12.0, rel=1e-6)  # a pure shift: |mu|^2
