import math

import pytest
import torch

from optimalsteps import OptimalStepsError
from optimalsteps.core.processes import (FLOW, PREDICTIONS, VE, VP, DiscreteDDPM, convert_prediction, convert_state,
                                    convert_times, from_x0_eps, get_process, to_x0_eps, ve_process)

T = torch.tensor([0.999, 0.9, 0.5, 0.1, 1e-3], dtype=torch.float64)


def test_closed_forms_at_points():
    assert torch.allclose(FLOW.alpha(T), 1 - T) and torch.allclose(FLOW.sigma(T), T)
    d = 20 - 0.1
    log_alpha = -0.25 * T**2 * d - 0.5 * 0.1 * T
    assert torch.allclose(VP.alpha(T), torch.exp(log_alpha))
    assert torch.allclose(VP.sigma(T), torch.sqrt(1 - torch.exp(2 * log_alpha)))
    assert torch.allclose(VE.sigma(T * 80), T * 80) and torch.all(VE.alpha(T) == 1)
    assert VE.t_start == 80 and FLOW.t_start == 1 and VP.t_clean == 0


@pytest.mark.parametrize("process", [FLOW, VP, VE])
def test_log_snr_inverse_and_derivatives(process):
    t = T * process.t_start
    lam = process.log_snr(t)
    assert torch.allclose(lam, torch.log(process.alpha(t) / process.sigma(t)))
    assert torch.allclose(process.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(process.t_from_sigma_ve(process.sigma_ve(t)), t, rtol=1e-9, atol=1e-12)
    h = 1e-6 * process.t_start
    dalpha, dsigma = process.derivatives(t[1:-1])
    fd_alpha = (process.alpha(t[1:-1] + h) - process.alpha(t[1:-1] - h)) / (2 * h)
    fd_sigma = (process.sigma(t[1:-1] + h) - process.sigma(t[1:-1] - h)) / (2 * h)
    assert torch.allclose(dalpha, fd_alpha, rtol=1e-5, atol=1e-8)
    assert torch.allclose(dsigma, fd_sigma, rtol=1e-5, atol=1e-8)


def test_flow_start_is_minus_infinite_log_snr():
    assert FLOW.log_snr(torch.tensor(1.0, dtype=torch.float64)) == -math.inf
    assert FLOW.log_snr(torch.tensor(0.0, dtype=torch.float64)) == math.inf


@pytest.mark.parametrize("process", [FLOW, VP, VE])
@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_prediction_conversions_round_trip(process, source, target, gen):
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = T * process.t_start
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x = alpha * x0 + sigma * eps
    out = from_x0_eps(source, x0, eps, t, process)
    back_x0, back_eps = to_x0_eps(source, out, x, t, process)
    assert torch.allclose(back_x0, x0, atol=1e-6) and torch.allclose(back_eps, eps, atol=1e-6)
    converted = convert_prediction(out, x, t, process, source, target)
    assert torch.allclose(converted, from_x0_eps(target, x0, eps, t, process), atol=1e-6)


def test_flow_velocity_is_eps_minus_x0(gen):
    x0, eps = torch.randn(4, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    assert torch.allclose(from_x0_eps("velocity", x0, eps, t, FLOW), eps - x0)
    assert torch.allclose(from_x0_eps("v", x0, eps, torch.full((4,), 0.3, dtype=torch.float64), VP),
                          VP.alpha(0.3) * eps - VP.sigma(0.3) * x0)


@pytest.mark.parametrize("source,target", [(FLOW, VP), (VP, VE), (VE, FLOW), (FLOW, VE)])
def test_convert_times_matches_snr_and_round_trips(source, target):
    t = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64) * source.t_start
    u = convert_times(t, source, target)
    assert torch.allclose(target.log_snr(u), source.log_snr(t), atol=1e-9)
    assert torch.allclose(convert_times(u, target, source), t, rtol=1e-9)
    assert convert_times(torch.tensor([source.t_clean]), source, target).item() == target.t_clean


def test_convert_state_preserves_the_scaled_state(gen):
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    t = torch.full((3,), 0.4, dtype=torch.float64)
    y, u = convert_state(x, t, FLOW, VE)
    assert torch.allclose(y, x / FLOW.alpha(0.4))
    assert torch.allclose(u, FLOW.sigma_ve(t))


def test_discrete_ddpm_schedules():
    sd = DiscreteDDPM("scaled_linear", 1000, 0.00085, 0.012)
    assert abs(float(sd.betas[0]) - 0.00085) < 1e-12 and abs(float(sd.betas[-1]) - 0.012) < 1e-12
    assert abs(float(sd.sigmas[-1]) - 14.6146) < 1e-3  # Stable Diffusion's sigma_max
    alpha, sigma = sd.alpha_sigma(torch.tensor([0, 999]))
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(2, dtype=torch.float64))
    ts = torch.tensor([0, 1, 250, 999], dtype=torch.float64)
    assert torch.allclose(sd.timestep_from_sigma(sd.sigma_from_timestep(ts)), ts, atol=1e-9)
    lin = DiscreteDDPM("linear", 1000, 0.0001, 0.02)
    assert torch.allclose(lin.betas, torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64))
    cos = DiscreteDDPM("squaredcos_cap_v2")
    assert cos.betas.max() <= 0.999 and (cos.alphas_cumprod[1:] < cos.alphas_cumprod[:-1]).all()
    assert sd.ve_process().t_start == pytest.approx(float(sd.sigmas[-1]))


def test_bad_names():
    with pytest.raises(OptimalStepsError, match="unknown process 'foo'"):
        get_process("foo")
    with pytest.raises(OptimalStepsError, match="unknown prediction type"):
        to_x0_eps("score", torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0.5]), FLOW)
    with pytest.raises(OptimalStepsError, match="unknown beta schedule"):
        DiscreteDDPM("cosine")
    with pytest.raises(OptimalStepsError):
        ve_process(-1.0)
