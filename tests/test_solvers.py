import math
import warnings

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, sample
from optimalsteps.core.schedules import karras, logsnr, uniform
from optimalsteps.core.solvers import nfe_per_trajectory, update_coefficients
from optimalsteps.core.processes import FLOW

EXPECTED_ORDER = {"euler": 1.0, "heun": 2.0, "dpmpp2m": 2.0}


def _schedule(process, n):
    # a grid whose log-SNR steps all shrink with n, so that each solver shows its own order
    if process == "ve":
        return karras(process, n)
    return logsnr(process, n, sigma_min=1e-3)


@pytest.fixture(scope="module")
def mixtures():
    out = {}
    for process in ("flow", "vp", "ve"):
        model = GaussianMixture.random(dim=3, components=3, seed=1, process=process)
        noise = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out[process] = (model, noise, model.exact_solution(noise))
    return out


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m"])
def test_convergence_order_against_exact_ode(mixtures, process, solver):
    model, noise, exact = mixtures[process]
    steps = [24, 48, 96]
    errors = [(sample(model, noise, _schedule(process, n), solver=solver).samples - exact).pow(2).mean().sqrt().item()
              for n in steps]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    expected = EXPECTED_ORDER[solver]
    assert all(abs(o - expected) < 0.35 for o in orders), (errors, orders)


def test_euler_is_flow_euler_and_kdiffusion_euler(gen):
    flow = GaussianMixture.random(dim=4, components=2, seed=3, process="flow")
    noise = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    times = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    x = noise.clone()
    for t, tn in zip(times[:-1], times[1:]):
        velocity = (x - flow(x, t.expand(5))) / t  # eps - x0 along the straight path
        x = x + (tn - t) * velocity
    assert torch.allclose(sample(flow, noise, times).samples, x, atol=1e-12)

    ve = GaussianMixture.random(dim=4, components=2, seed=3, process="ve")
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.0], dtype=torch.float64)
    x = noise * 80.0
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        d = (x - ve(x, s.expand(5))) / s
        x = x + d * (sn - s)
    assert torch.allclose(sample(ve, noise, sigmas).samples, x, atol=1e-10)


def test_dpmpp2m_first_step_is_first_order_and_flow_start_has_no_nan(gen):
    model = GaussianMixture.random(dim=4, components=2, seed=2, process="flow")
    noise = torch.randn(6, 4, generator=gen)
    sched = uniform("flow", 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sample(model, noise, sched, solver="dpmpp2m")
    assert torch.isfinite(out.samples).all()
    c = update_coefficients("dpmpp2m", FLOW, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.2]),
                            torch.tensor([1.0, 1.0]))
    assert c[2][0] == 0 and c[2][1] == 0  # previous lambda is -inf: no second-order term
    one = sample(model, noise, torch.tensor([1.0, 0.5, 0.0]), solver="dpmpp2m").samples
    assert torch.isfinite(one).all()


def test_dpmpp2m_last_step_returns_the_clean_estimate(gen):
    model = GaussianMixture.random(dim=4, components=2, seed=2, process="vp")
    noise = torch.randn(3, 4, generator=gen)
    res = sample(model, noise, torch.tensor([1.0, 0.3, 0.05, 0.0]), solver="dpmpp2m", return_trajectory=True)
    before = res.trajectory[-2]
    atol = 64 * torch.finfo(torch.float32).eps * float(res.samples.abs().max())  # float32 states
    assert torch.allclose(res.samples, model(before, torch.full((3,), 0.05)), atol=atol)


def test_nfe_counts(gen):
    model = GaussianMixture.random(dim=2, components=2, seed=0)
    noise = torch.randn(3, 2, generator=gen)
    for solver, expected in (("euler", 5), ("dpmpp2m", 5), ("heun", 9)):
        assert sample(model, noise, uniform("flow", 5), solver=solver).nfe == expected == nfe_per_trajectory(solver, 5)


class _Half:
    """Runs a mixture in bfloat16: the state must stay float32."""

    process, prediction = "flow", "x0"

    def __init__(self):
        self.inner = GaussianMixture.random(dim=4, components=2, seed=0)

    def __call__(self, x, t):
        assert x.dtype == torch.float32
        return self.inner(x, t).to(torch.bfloat16)


def test_low_precision_model_keeps_float32_state(gen):
    out = sample(_Half(), torch.randn(2, 4, generator=gen), uniform("flow", 4), solver="dpmpp2m")
    assert out.samples.dtype == torch.float32


class _Broken:
    process, prediction = "flow", "velocity"

    def __init__(self, bad_time, kind="nan"):
        self.bad_time, self.kind = bad_time, kind

    def __call__(self, x, t):
        if self.kind == "shape":
            return x[:, :1]
        out = torch.zeros_like(x)
        if float(t[0]) <= self.bad_time:
            out[0, 0] = float("nan")
        return out


def test_model_nan_or_wrong_shape_names_step_and_time(gen):
    noise = torch.randn(2, 3, generator=gen)
    with pytest.raises(OptimalStepsError, match=r"step 3 of 4: model returned NaN/inf at t=0\.5"):
        sample(_Broken(0.5), noise, uniform("flow", 4))
    with pytest.raises(OptimalStepsError, match=r"step 1 of 4: model returned shape \(2, 1\)"):
        sample(_Broken(0.0, "shape"), noise, uniform("flow", 4))


def test_unknown_solver_and_mismatched_process(gen):
    model = GaussianMixture.random(dim=2, components=1, seed=0)
    with pytest.raises(OptimalStepsError, match="unknown solver 'rk4'"):
        sample(model, torch.randn(1, 2), uniform("flow", 3), solver="rk4")
    with pytest.raises(OptimalStepsError, match="schedule is for process 've'"):
        sample(model, torch.randn(1, 2), uniform("ve", 3))
