"""UniPC (bh2, solver order 2, UniC corrector, data prediction): the solver, its DP, and diffusers' scheduler."""

import itertools
import math

import numpy as np
import pytest
import torch

from optimalsteps import GaussianMixture, sample, search
from optimalsteps.core.processes import FLOW, VP
from optimalsteps.core.schedules import karras, logsnr
from optimalsteps.core.solvers import UNIPC_FLOW_MAX, get_solver, nfe_per_trajectory, unic_coefficients
from optimalsteps.optimize.options import Checkpointing, DPOptions, Storage

EPS64 = torch.finfo(torch.float64).eps


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().item()


# ------------------------------------------------------------------------------ the DP is exact


def _dp_by_sampling(model, noise, grid, steps):
    """The search's recursion rebuilt from `sample` alone: cell (k, j) keeps the best of every reachable
    cell (k-1, i) extended by one step to j (scored on the state at j against the teacher's there, ties to
    the lower i). Returns its cost table {(k, j): cost} and the traced path."""
    n = len(grid) - 1
    teacher = sample(model, noise, grid, solver="unipc", return_trajectory=True).trajectory
    paths, costs = {(0, 0): [0]}, {(0, 0): 0.0}
    for k in range(1, steps + 1):
        targets = range(k, n - steps + k + 1) if k < steps else [n]
        for j in targets:
            best = None
            for (kk, i), path in paths.items():
                if kk != k - 1 or i >= j:
                    continue
                times = grid[path + [j] + ([n] if j < n else [])]
                state = sample(model, noise, times, solver="unipc", return_trajectory=True).trajectory[k]
                cost = _error(state, teacher[j])
                if best is None or cost < best[0]:
                    best = (cost, path + [j])
            costs[(k, j)], paths[(k, j)] = best
    return costs, paths[(steps, n)]


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_dp_against_brute_force_on_a_small_grid(process):
    model = GaussianMixture.random(dim=6, components=3, seed=4, process=process)
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = 10
    for steps in (1, 2, 3, 4):
        result = search(model, noise, steps=steps, teacher_steps=n, solver="unipc", method="dp")
        grid = result.teacher.times
        realised = _error(sample(model, noise, result.schedule, solver="unipc").samples, result.teacher_samples)
        assert realised == pytest.approx(result.dp_cost, rel=1e-9, abs=1e-14)
        # every cell of the DP's table is the brute-force best one-step extension of the previous layer
        costs, path = _dp_by_sampling(model, noise, grid, steps)
        assert result.indices == path
        for (k, j), cost in costs.items():
            assert float(result.cost_table[k, j]) == pytest.approx(cost, rel=1e-9, abs=1e-14)
        finals = {p: _error(sample(model, noise, grid[[0, *p, n]], solver="unipc").samples, result.teacher_samples)
                  for p in itertools.combinations(range(1, n), steps - 1)}
        assert min(finals.values()) <= result.dp_cost * (1 + 1e-9)
        if steps <= 2:  # one state per cell loses nothing here: the DP is the global optimum
            assert realised == pytest.approx(min(finals.values()), rel=1e-9, abs=1e-14)


def test_dp_with_x0_cost_median_coarse_to_fine_and_free_start_stays_exact():
    model = GaussianMixture.random(dim=6, components=3, seed=2, process="vp")
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for options in (DPOptions(cost="x0"), DPOptions(coarse_to_fine=True), DPOptions(free_start=True)):
        # the x0 cost scores the final cell on the state itself (the clean end's estimate is the state)
        result = search(model, noise, steps=4, teacher_steps=24, solver="unipc", dp=options)
        out = sample(model, noise, result.schedule, solver="unipc").samples
        assert _error(out, result.teacher_samples) == pytest.approx(result.dp_cost, rel=1e-9, abs=1e-14), options
    result = search(model, noise, steps=4, teacher_steps=24, solver="unipc", dp=DPOptions(aggregate="median"))
    for b, schedule in enumerate(result.per_sample):  # each sample's own path realises its own cost
        out = sample(model, noise[b:b + 1], schedule, solver="unipc").samples
        assert _error(out, result.teacher_samples[b:b + 1]) == pytest.approx(
            float(result.cost_table[b, 4, 24]), rel=1e-9, abs=1e-14)


# ------------------------------------------------------------------------------ convergence order


def _grid(process, n):
    return karras(process, n) if process == "ve" else logsnr(process, n, sigma_min=1e-3)


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_convergence_order_against_exact_ode(process):
    model = GaussianMixture.random(dim=3, components=3, seed=1, process=process)
    noise = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = model.exact_solution(noise)
    errors = [(sample(model, noise, _grid(process, n), solver="unipc").samples - exact).pow(2).mean().sqrt().item()
              for n in (24, 48, 96)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    # UniC raises UniP-2's order by one: the corrected method is third order (the solver's `order`)
    assert all(abs(o - get_solver("unipc").order) < 0.35 for o in orders), (errors, orders)


def test_corrector_coefficients_limits():
    # first order: the trapezoid 1/2, 1/2 between the estimates at both ends
    k = unic_coefficients(VP, torch.tensor([0.6]), torch.tensor([0.4]))
    assert float(k[1]) == pytest.approx(float(k[3])) and float(k[2]) == 0
    # the estimates' weights add up to the DDIM weight alpha_t (1 - e^{-h}) for any order
    t_from, t, t_before = torch.tensor([0.6, 0.5]), torch.tensor([0.4, 0.45]), torch.tensor([0.8, 0.55])
    k = unic_coefficients(VP, t_from, t, t_before)
    ddim = VP.alpha(t) - VP.alpha(t_from) * VP.sigma(t) / VP.sigma(t_from)
    assert torch.allclose(k[1] + k[2] + k[3], ddim, rtol=0, atol=100 * EPS64)
    # the series branch (tiny h) meets the closed form
    near = unic_coefficients(VP, torch.tensor([0.5]), torch.tensor([0.5 - 1e-4]), torch.tensor([0.5 + 1e-4]))
    assert all(torch.isfinite(c).all() for c in near)
    # a previous estimate at the flow start counts as at 1 - 1e-6, where diffusers' scheduler puts it:
    # finite, with the weight it has there
    k = unic_coefficients(FLOW, torch.tensor([0.7]), torch.tensor([0.4]), torch.tensor([1.0]))
    at_max = unic_coefficients(FLOW, torch.tensor([0.7]), torch.tensor([0.4]), torch.tensor([UNIPC_FLOW_MAX], dtype=torch.float64))
    assert all(torch.isfinite(c).all() for c in k) and float(k[2]) != 0
    assert all(torch.equal(a, b) for a, b in zip(k, at_max))


def test_nfe_and_flow_start():
    model = GaussianMixture.random(dim=4, components=2, seed=0, process="flow")
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0]), solver="unipc")
    assert out.nfe == 4 == nfe_per_trajectory("unipc", 4) and torch.isfinite(out.samples).all()


# ------------------------------------------------------------------------------ diffusers' scheduler


def _run_scheduler(scheduler, model, x, times):
    """diffusers' own UniPC stepping of the exact model, in float64 (its sigma table promoted so both
    sides compute every coefficient in the same precision)."""
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    scheduler.set_begin_index(0)
    kind = scheduler.config.prediction_type
    for i, timestep in enumerate(scheduler.timesteps):
        t = torch.full((x.shape[0],), float(times[i]), dtype=torch.float64)
        x0 = model(x, t)
        s = float(scheduler.sigmas[i])
        if kind == "flow_prediction":
            output = (x - x0) / s  # velocity: x0 = x - sigma v
        else:  # epsilon, with diffusers' alpha = 1 / sqrt(1 + s^2), sigma = s alpha
            a = 1.0 / math.sqrt(1.0 + s * s)
            output = (x - a * x0) / (s * a)
        x = scheduler.step(output, timestep, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_equals_diffusers_unipc_flow(steps):
    diffusers = pytest.importorskip("diffusers")
    model = GaussianMixture.random(dim=5, components=3, seed=1, process="flow")
    noise = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Wan's scheduler: flow sigmas shifted by flow_shift, custom sigmas accepted
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, solver_order=2, solver_type="bh2",
                                                  predict_x0=True, lower_order_final=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.02, steps))
    times = scheduler.sigmas.to(torch.float64)  # shifted, ending at 0; diffusers' flow sigma is the flow time
    ref = _run_scheduler(scheduler, model, noise * times[0], times)
    ours = sample(model, noise, times, solver="unipc").samples
    assert torch.allclose(ours, ref, rtol=0, atol=64 * EPS64 * float(ref.abs().max())), (ours - ref).abs().max()


@pytest.mark.parametrize("steps", [2, 5, 10])
def test_equals_diffusers_unipc_vp(steps):
    diffusers = pytest.importorskip("diffusers")
    model = GaussianMixture.random(dim=5, components=3, seed=1, process="vp")
    noise = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Stable Diffusion's noise table, epsilon prediction; non-flow UniPC takes no custom sigmas, so both
    # sides run the scheduler's own sigmas (k-diffusion sigmas: the VP time with the same sigma/alpha)
    scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(torch.float64)
    times = torch.cat([VP.t_from_sigma_ve(sigmas[:-1]), torch.zeros(1, dtype=torch.float64)])
    ref = _run_scheduler(scheduler, model, noise * VP.sigma(times[0]), times)
    ours = sample(model, noise, times, solver="unipc").samples
    assert torch.allclose(ours, ref, rtol=0, atol=64 * EPS64 * float(ref.abs().max())), (ours - ref).abs().max()


def test_resume_and_target_blocks_give_the_same_schedule(tmp_path):
    model = GaussianMixture.random(dim=6, components=3, seed=2, process="flow")
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    whole = search(model, noise, steps=4, teacher_steps=30, solver="unipc", method="dp")

    class Stop(Exception):
        pass

    def stop_after_two(stage, done, total):
        if stage == "layer" and done == 2:
            raise Stop

    with pytest.raises(Stop):
        search(model, noise, steps=4, teacher_steps=30, solver="unipc",
               checkpointing=Checkpointing(dir=str(tmp_path)), callback=stop_after_two)
    resumed = search(model, noise, steps=4, teacher_steps=30, solver="unipc",
                     checkpointing=Checkpointing(dir=str(tmp_path), resume=True))
    blocks = search(model, noise, steps=4, teacher_steps=30, solver="unipc",
                    storage=Storage(place="cpu", target_chunk=5))
    assert resumed.indices == blocks.indices == whole.indices
    assert resumed.dp_cost == pytest.approx(whole.dp_cost, rel=1e-6)
    assert blocks.dp_cost == pytest.approx(whole.dp_cost, rel=1e-6)


# ------------------------------------------------------------------------------ the validated search


@pytest.mark.parametrize("process", ["flow", "vp"])
def test_the_validated_search_is_the_default_for_unipc(process):
    from optimalsteps.core.models import default_teacher_grid
    from optimalsteps.optimize.objectives import aggregate, per_sample_error
    from optimalsteps.optimize.select import validation_noise
    from optimalsteps.optimize.teacher import run_teacher

    model = GaussianMixture.random(dim=6, components=3, seed=2, process=process)
    noise = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = search(model, noise, steps=4, teacher_steps=200, solver="unipc", seed=5)
    plain = search(model, noise, steps=4, teacher_steps=200, solver="unipc", method="dp")
    meta = result.schedule.metadata
    assert meta["selection_method"] == "validated" and meta["solver"] == result.schedule.solver == "unipc"
    assert "selection_method" not in plain.schedule.metadata
    names = [row["name"] for row in meta["selection"]]
    assert "dp-log" in names and any(name.startswith("dp-log-w4") for name in names)  # the beam ran with unipc
    assert result.nfe <= 2 * plain.nfe == 2 * meta["plain_dp_nfe"]
    # the winner's validation score is what UniPC realises with it on the validation set
    val = validation_noise(noise, meta["validation_samples"], 5)
    reference = run_teacher(model, val, default_teacher_grid(model.process, 200), "unipc").states[:, -1]
    out = sample(model, val, result.schedule, solver="unipc").samples
    won = float(aggregate(per_sample_error(out, reference), "log"))
    assert won == pytest.approx(result.dp_cost, rel=EPS64 * 1e6)
    assert won <= min(row["score"] for row in meta["selection"] if row["eligible"]) + EPS64 * 1e6 * abs(won)


def test_the_beam_search_for_unipc_realises_its_score():
    from optimalsteps.optimize.objectives import aggregate, per_sample_error

    model = GaussianMixture.random(dim=6, components=3, seed=3, process="ve")
    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = search(model, noise, steps=4, teacher_steps=16, solver="unipc", method="dp", objective="log", width=3)
    assert result.schedule.metadata["width"] == 3 and result.schedule.solver == "unipc"
    out = sample(model, noise, result.schedule, solver="unipc").samples
    assert float(aggregate(per_sample_error(out, result.teacher_samples), "log")) == pytest.approx(
        result.dp_cost, rel=EPS64 * 1e6)


def test_compare_runs_the_validated_search_for_unipc():
    from optimalsteps.evaluation.compare import compare

    model = GaussianMixture.random(dim=3, components=2, seed=2, process="flow")
    result = compare(model, steps=[3], solvers=["unipc"], schedules=["oss", "uniform"], samples=4,
                     eval_samples=16, seed=0, teacher_steps=20)
    oss = next(row for row in result.rows if row["schedule"] == "oss")
    assert oss["solver"] == "unipc" and oss["nfe"] == 3 and math.isfinite(oss["psnr"])
    assert oss["selection"] and "dp-log" in {c["name"] for c in oss["selection"]}
