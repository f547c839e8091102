"""The exact empirical denoiser: against a direct softmax, the Gaussian mixture, and at tiny sigma."""

import math

import numpy as np
import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, closed_form, load_model, predict_x0, sample
from optimalsteps.testbeds.empirical import EmpiricalDenoiser, load_empirical
from optimalsteps.core.processes import get_process


def _points(n=7, d=5, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _direct_posterior_mean(points, x, t, process):
    """The softmax over all points at once, from explicit squared distances."""
    process = get_process(process)
    alpha = process.alpha(t)[:, None]
    sigma = process.sigma(t)[:, None]
    dist2 = ((x[:, None, :] - alpha[:, :, None] * points[None]) ** 2).sum(-1)
    weights = torch.softmax(-dist2 / (2 * sigma**2), dim=1)
    return weights @ points


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_matches_direct_softmax_for_any_chunking(process, chunk):
    points = _points()
    model = EmpiricalDenoiser(points, process, chunk=chunk)
    p = get_process(process)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64) * p.t_start
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * p.sigma(t)[:, None]
    x = x + p.alpha(t)[:, None] * points[:4]
    expected = _direct_posterior_mean(points, x, t, process)
    assert torch.allclose(model(x, t), expected, rtol=0, atol=1e-12)


def test_agrees_with_gaussian_mixture_of_narrow_components():
    # an independent implementation: a mixture with one very narrow component per point
    points = _points(n=6, d=3, seed=2)
    mixture = GaussianMixture(torch.ones(6), points, torch.full((6,), 1e-7), process="vp")
    model = EmpiricalDenoiser(points, "vp", chunk=4)
    t = torch.tensor([0.8, 0.4, 0.1], dtype=torch.float64)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(model(x, t), mixture(x, t), atol=1e-9)


@pytest.mark.parametrize("t", [1e-4, 1e-9, 1e-30, 1e-200, 0.0])
def test_tiny_sigma_snaps_to_nearest_point_without_overflow(t):
    points = _points(n=50, d=8, seed=4)
    model = EmpiricalDenoiser(points, "flow", chunk=16)
    # states a little off three training points, nearer to them than to any other point
    x = points[[3, 17, 42]] + 1e-3 * torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = model(x, torch.full((3,), t, dtype=torch.float64))
    assert torch.isfinite(out).all()
    if t <= 1e-9:
        assert torch.equal(out, points[[3, 17, 42]])
    else:
        assert (out - points[[3, 17, 42]]).abs().max() < 1e-2


def test_flow_start_gives_the_data_mean():
    points = _points(n=9, d=4, seed=6)
    model = EmpiricalDenoiser(points, "flow")
    out = model(torch.randn(2, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(out, points.mean(0).expand(2, 4), atol=1e-14)


def test_digits_denoiser_samples_are_training_images():
    model = load_model("empirical:digits")
    assert model.sample_shape == (1, 8, 8) and len(model) == 1500
    assert float(model.points.min()) >= -1.0 and float(model.points.max()) <= 1.0
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, closed_form("uniform", "flow", 30)).samples
    nearest = torch.cdist(out.reshape(6, -1).double(), model.points.reshape(1500, -1)).min(dim=1).values
    assert nearest.max() < 1e-5  # the exact denoiser's ODE ends on training images: it memorises


def test_predict_x0_in_float32_state():
    model = load_empirical("digits", process="vp", points="200")
    x = torch.randn(3, 1, 8, 8)
    x0 = predict_x0(model, x, torch.tensor([0.9, 0.5, 0.1]))
    assert x0.dtype == torch.float32 and x0.shape == x.shape and torch.isfinite(x0).all()


def test_data_samples_are_training_points():
    model = load_empirical("digits", points=40)
    draws = model.data_samples(10, torch.Generator().manual_seed(0))
    flat = model.points.reshape(40, -1)
    assert all(bool((flat == d.reshape(1, -1)).all(dim=1).any()) for d in draws)
    assert model.data_samples(100, torch.Generator().manual_seed(0)).shape == (100, 1, 8, 8)


def test_npy_file(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3))
    model = load_model(f"empirical:{path},process=ve")
    assert model.sample_shape == (3,) and model.process.kind == "ve"
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(OptimalStepsError, match="not a readable"):
        load_model(f"empirical:{bad}")


def test_bad_input():
    with pytest.raises(OptimalStepsError, match="known: digits, mnist"):
        load_model("empirical:cifar")
    with pytest.raises(OptimalStepsError, match="unknown empirical option"):
        load_model("empirical:digits,size=3")
    with pytest.raises(OptimalStepsError, match="unknown process"):
        load_model("empirical:digits,process=edm")
    with pytest.raises(OptimalStepsError, match="whole number"):
        load_empirical("digits", points="many")
    with pytest.raises(OptimalStepsError, match="NaN"):
        EmpiricalDenoiser(torch.tensor([[0.0, math.nan]]))
    model = load_empirical("digits", points=10)
    with pytest.raises(OptimalStepsError, match="shape"):
        model(torch.zeros(2, 64), torch.ones(2))
