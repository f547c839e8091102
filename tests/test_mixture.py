import json
import math

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, load_model


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_exact_solution_of_a_single_gaussian_is_the_affine_map(process, gen):
    mean, std = torch.tensor([[0.5, -1.0, 2.0]]), 0.4
    model = GaussianMixture([1.0], mean.tolist(), [std], process)
    noise = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    p = model.process
    t0 = torch.tensor(p.t_start, dtype=torch.float64)
    # x_start = sigma0 * eps has marginal N(alpha0 mu, alpha0^2 s^2 + sigma0^2): its standard score maps to mu + s z
    alpha0, sigma0 = p.alpha(t0), p.sigma(t0)
    z = (sigma0 * noise - alpha0 * mean) / torch.sqrt(alpha0**2 * std**2 + sigma0**2)
    assert torch.allclose(model.exact_solution(noise), mean + std * z, atol=1e-6)


def test_posterior_mean_and_log_prob():
    model = GaussianMixture([0.3, 0.7], [[0.0, 0.0], [2.0, 1.0]], [[0.5, 0.2], [0.3, 0.3]])
    x = torch.tensor([[0.1, 0.2], [1.9, 0.8]], dtype=torch.float64)
    assert torch.allclose(model.posterior_mean(x, torch.zeros(2, dtype=torch.float64)), x)
    from scipy.stats import multivariate_normal
    expected = [math.log(0.3 * multivariate_normal.pdf(v, [0, 0], [0.25, 0.04])
                         + 0.7 * multivariate_normal.pdf(v, [2, 1], [0.09, 0.09])) for v in x.numpy()]
    assert torch.allclose(model.log_prob(x), torch.tensor(expected, dtype=torch.float64))
    far = model.posterior_mean(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(far, (0.3 * torch.tensor([0.0, 0.0]) + 0.7 * torch.tensor([2.0, 1.0])).double()[None])


def test_data_samples_match_the_mixture_moments():
    model = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [0.1, 0.1])
    data = model.data_samples(20000, torch.Generator().manual_seed(0))
    assert abs(float(data.mean())) < 0.05 and abs(float(data.var()) - 4.01) < 0.1


def test_specs_and_files(tmp_path):
    m = load_model("gmm:dim=5,components=3,seed=2,process=vp")
    assert m.sample_shape == (5,) and m.process.name == "vp" and m.means.shape == (3, 5)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(m.to_json()))
    back = load_model(f"gmm:{path}")
    assert torch.allclose(back.means, m.means) and back.process.name == "vp"


@pytest.mark.parametrize("data,message", [
    ({"weights": [1], "means": [[0, 0]]}, "missing key"),
    ({"weights": [1, 1], "means": [[0, 0]], "stds": [1]}, "'means' must be"),
    ({"weights": [1], "means": [[0, 0]], "stds": [[1, 1, 1]]}, "'stds' must be"),
    ({"weights": [1], "means": [[0, 0]], "stds": [0]}, "stds' must all be positive"),
    ({"weights": [-1], "means": [[0, 0]], "stds": [1]}, "weights' must all be positive"),
    ({"weights": [1], "means": [[0, 0]], "stds": [1], "process": "edm"}, "unknown process"),
])
def test_bad_mixture_files(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OptimalStepsError, match=message):
        load_model(f"gmm:{path}")


def test_bad_mixture_specs(tmp_path):
    with pytest.raises(OptimalStepsError, match="unknown gmm option"):
        load_model("gmm:dims=4")
    with pytest.raises(OptimalStepsError, match="bad gmm option"):
        load_model("gmm:dim=four")
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(OptimalStepsError, match="not valid JSON"):
        load_model(f"gmm:{tmp_path / 'x.json'}")
