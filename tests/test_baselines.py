"""Baseline schedules: closed forms against their formulas, published tables at their native step counts,
GITS / BOSS / DM against small hand-checked cases, and the entry point's errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from optimalsteps.core.dm import dm, dm_objective
from optimalsteps.core.tables import TABLES, get_table, table_levels
from optimalsteps.evaluation.baselines import (line_deviation, local_cost_matrix, local_dp, make_schedule, make_schedules,
                                               schedule_names)
from optimalsteps.cli import main
from optimalsteps.core.errors import OptimalStepsError
from optimalsteps.testbeds.mixture import GaussianMixture
from optimalsteps.core.processes import DiscreteDDPM, get_process, ve_process
from optimalsteps.core.schedules import CLOSED_FORMS, Schedule, flux_mu, loglinear_interp, uniform


def times(schedule):
    return schedule.times.numpy()


# ------------------------------------------------------------------------------------ closed forms


def test_uniform_is_linear_in_native_time():
    np.testing.assert_allclose(times(make_schedule("uniform", "flow", 4)), [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(times(make_schedule("uniform", "ve", 2)), [80, 40, 0])


def test_karras_matches_the_edm_formula():
    rho, lo, hi = 7.0, 0.002, 80.0
    expected = [(hi ** (1 / rho) + i / 4 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(5)] + [0.0]
    np.testing.assert_allclose(times(make_schedule("karras", "ve", 5)), expected, rtol=1e-12)
    # flow: the same sigmas mapped by SNR (t = s / (1 + s)), the first pinned to the flow start
    flow = times(make_schedule("karras", "flow", 5))
    assert flow[0] == 1.0
    np.testing.assert_allclose(flow[1:-1], [s / (1 + s) for s in expected[1:-1]], rtol=1e-12)
    # vp: sigma_max defaults to the process's own largest sigma / alpha
    vp = make_schedule("karras", "vp", 3)
    np.testing.assert_allclose(vp.to_sigmas().numpy()[1], (152.2 ** (1 / 7) / 2 + 0.002 ** (1 / 7) / 2) ** 7, rtol=1e-3)


def test_logsnr_has_a_constant_sigma_ratio():
    sigmas = times(make_schedule("logsnr", "ve", 5))
    ratios = sigmas[1:-1] / sigmas[:-2]
    np.testing.assert_allclose(ratios, (0.002 / 80) ** 0.25, rtol=1e-12)
    assert sigmas[-2] == pytest.approx(0.002)


def test_shift_static_and_flux_mu():
    # SD3: 3 t / (1 + 2 t) of t = 1, 3/4, 1/2, 1/4
    np.testing.assert_allclose(times(make_schedule("shift", "flow", 4, shift=3.0)), [1, 0.9, 0.75, 0.5, 0])
    # Flux: e^mu / (e^mu + 1/t - 1); mu = log 2 at t = 1/2 gives 2/3
    np.testing.assert_allclose(times(make_schedule("shift", "flow", 2, mu=math.log(2))), [1, 2 / 3, 0])
    assert flux_mu(4096) == pytest.approx(1.15) and flux_mu(256) == pytest.approx(0.5)
    by_tokens = make_schedule("shift", "flow", 6, image_seq_len=4096)
    np.testing.assert_allclose(times(by_tokens), times(make_schedule("shift", "flow", 6, mu=1.15)))
    # vp: the same noise levels, matched by SNR
    vp = make_schedule("shift", "vp", 4, shift=3.0)
    np.testing.assert_allclose(vp.in_process("flow").times.numpy()[1:], [0.9, 0.75, 0.5, 0], atol=1e-9)


def test_shift_refuses_steps_that_collapse_above_the_largest_noise():
    with pytest.raises(OptimalStepsError, match="largest noise level of process ve"):
        make_schedule("shift", "ve", 200)


def test_beta_uses_beta_quantiles_of_the_timestep_axis():
    from scipy.stats import beta as beta_dist

    flow = times(make_schedule("beta", "flow", 4))
    np.testing.assert_allclose(flow[:-1], beta_dist.ppf([1, 0.75, 0.5, 0.25], 0.6, 0.6))
    assert flow[2] == pytest.approx(0.5) and flow[1] == pytest.approx(1 - flow[3])  # Beta(a, a) is symmetric
    # ve: fractions of log sigma between 0.002 and 80, so the median lands on their geometric mean
    assert times(make_schedule("beta", "ve", 2))[1] == pytest.approx(math.sqrt(0.002 * 80))


def test_kl_optimal_is_linear_in_arctan_sigma():
    ve = times(make_schedule("kl-optimal", "ve", 3))
    assert ve[1] == pytest.approx(math.tan((math.atan(80) + math.atan(0.002)) / 2))
    assert ve[2] == pytest.approx(0.002)
    # flow: sigma_max is infinite, arctan = pi / 2
    flow = make_schedule("kl-optimal", "flow", 3).to_sigmas()  # flow times
    s = math.tan((math.pi / 2 + math.atan(0.002)) / 2)
    assert float(flow[1]) == pytest.approx(s / (1 + s))


def test_cosine_is_uniform_in_cosine_time():
    # sigma / alpha = tan(pi u / 2); flow starts at u = 1, so u = 1/2 is flow time 1/2
    np.testing.assert_allclose(times(make_schedule("cosine", "flow", 2)), [1, 0.5, 0], atol=1e-12)
    # ve(80) starts at u = 2/pi atan(80): halfway is sigma tan(atan(80) / 2)
    assert times(make_schedule("cosine", "ve", 2))[1] == pytest.approx(math.tan(math.atan(80) / 2))


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
def test_every_closed_form_is_a_valid_schedule(name, process):
    for steps in (1, 3, 10):
        s = make_schedule(name, process, steps)
        assert s.steps == steps and s.times[0] == get_process(process).t_start and s.times[-1] == 0


# ------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("name", list(TABLES))
def test_tables_reproduce_at_their_native_step_count(name):
    table = TABLES[name]
    expected = np.array(table.levels[:-1] + (0.0,))
    if table.space == "flow":
        got = make_schedule(name, "flow", table.steps)
        np.testing.assert_allclose(got.to_sigmas().numpy(), expected, rtol=1e-12, atol=1e-12)
    else:
        # on a VE process wide enough, the schedule's sigmas are the table's
        process = ve_process(max(table.levels[0], 80.0))
        got = make_schedule(name, process, table.steps, pin_start=False)
        np.testing.assert_allclose(got.to_sigmas().numpy(), expected, rtol=1e-12)
    assert "source" in got.metadata and got.metadata["native_steps"] == table.steps


def test_ays_sd15_on_stable_diffusions_own_process():
    process = DiscreteDDPM().ve_process()  # sigma_max 14.6146...
    got = make_schedule("ays-sd15", process, 10).to_sigmas().numpy()
    np.testing.assert_allclose(got, list(TABLES["ays-sd15"].levels[:-1]) + [0.0], rtol=1e-6)


def test_ays_sd_tables_are_sd_sigmas_at_the_published_timesteps():
    sigmas = DiscreteDDPM().sigmas.numpy()
    sd15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0]
    sdxl = [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]
    np.testing.assert_allclose(TABLES["ays-sd15"].levels, sigmas[sd15], atol=1e-10)  # 10 decimals
    np.testing.assert_allclose(TABLES["ays-sdxl"].levels, sigmas[sdxl], atol=1e-10)


def test_ays_tables_agree_with_diffusers():
    schedules = pytest.importorskip("diffusers.schedulers")
    ays = schedules.AysSchedules
    assert ays["StableDiffusionTimesteps"] == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    # diffusers keeps AYS's continuous sigmas to 3 decimals: within 1.4% of the timestep-derived ones
    for key, name in (("StableDiffusionSigmas", "ays-sd15"), ("StableDiffusionXLSigmas", "ays-sdxl"),
                      ("StableDiffusionVideoSigmas", "ays-svd")):
        np.testing.assert_allclose(table_levels(TABLES[name], 10)[:-1], ays[key][:-1], rtol=1.5e-2)


def test_tables_interpolate_log_linearly_to_other_step_counts():
    table = TABLES["oss-flux"]
    got = make_schedule("oss-flux", "flow", 5).to_sigmas().numpy()
    expected = loglinear_interp(np.array(table.levels), 6)
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=1e-12)
    assert got[0] == pytest.approx(0.9968) and got[-1] == 0
    # AYS's first level is the model's largest sigma: it maps to the process start
    assert make_schedule("ays-sdxl", "flow", 7).times[0] == 1.0


def test_table_family_errors_name_the_families():
    with pytest.raises(OptimalStepsError, match=r"no table for model family 'flux'.*sd15, sdxl, svd"):
        make_schedule("ays", "flow", 10, family="flux")
    with pytest.raises(OptimalStepsError, match=r"no table for model family 'sd15'.*flux, wan, chroma"):
        make_schedule("oss-sd15", "flow", 10)
    with pytest.raises(OptimalStepsError, match="needs a model family"):
        make_schedule("oss-table", "flow", 10)
    assert get_table("oss-table", "WAN").name == "oss-wan"


def test_table_outside_the_process_range_is_refused():
    with pytest.raises(OptimalStepsError, match="oss-wan has noise levels above the largest of process ve"):
        make_schedule("oss-wan", "ve", 20)


# -------------------------------------------------------------------------------- GITS, BOSS, DM


def test_line_deviation_by_hand():
    start = torch.tensor([[0.0, 0.0]])
    end = torch.tensor([[2.0, 0.0]])
    points = torch.tensor([[[1.0, 1.0], [3.0, -2.0], [0.5, 0.0]]])
    np.testing.assert_allclose(line_deviation(points, start, end).numpy(), [[1.0, 2.0, 0.0]])


def _brute_force(cost, steps, coeff):
    n = cost.shape[0] - 1
    best, best_path = math.inf, None
    for inner in itertools.combinations(range(1, n), steps - 1):
        path = (0,) + inner + (n,)
        value = sum(coeff ** k * cost[a, b] for k, (a, b) in enumerate(zip(path, path[1:])))
        if value < best:
            best, best_path = value, list(path)
    return best_path


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_local_dp_matches_brute_force(coeff):
    rng = np.random.default_rng(3)
    n = 7
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        cost[i, i + 1:] = rng.uniform(-0.5, 2.0, size=n - i)  # GITS's "dev" costs can be negative
    for steps in range(1, n + 1):
        assert local_dp(cost, steps, coeff) == _brute_force(cost, steps, coeff)
    with pytest.raises(OptimalStepsError, match="exceed"):
        local_dp(cost, n + 1)


def test_local_dp_small_case_by_hand():
    inf = np.inf
    cost = np.array([[inf, 1.0, 3.0], [inf, inf, 1.0], [inf, inf, inf]])
    assert local_dp(cost, 1) == [0, 2]
    assert local_dp(cost, 2, coeff=1.0) == [0, 1, 2]


def test_local_costs_from_an_euler_teacher():
    mixture = GaussianMixture.random(dim=3, components=2, seed=1, process="flow")
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    teacher = uniform("flow", 8)
    cost = local_cost_matrix(mixture, noise, teacher, "euler", "l2sq")
    # a one-index jump is exactly the teacher's own Euler step: zero cost; longer jumps cost something
    np.testing.assert_allclose(np.diag(cost, 1), 0.0, atol=1e-10)
    assert np.all(np.isinf(cost[np.tril_indices(9)]))
    assert np.all(cost[np.triu_indices(9, 2)] > 0)
    # the GITS "dev" cost of jumping to the clean end is the jump's distance from the start-end chord
    dev = local_cost_matrix(mixture, noise, teacher, "euler", "dev")
    assert np.all(np.isfinite(dev[np.triu_indices(9, 1)]))


def test_gits_and_boss_pick_points_of_their_paper_grids():
    mixture = GaussianMixture.random(dim=3, components=2, seed=1, process="vp")
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    gits = make_schedules("gits", None, [2, 4], model=mixture, noise=noise, teacher_steps=12)
    grid = make_schedule("karras", "vp", 12).times
    for m, s in gits.items():
        assert s.steps == m and s.metadata["coeff"] == 1.15 and s.metadata["metric"] == "dev"
        assert all(bool(torch.isclose(grid, t).any()) for t in s.times)
    boss = make_schedule("boss", None, 3, model=mixture, noise=noise, teacher_steps=10)
    np.testing.assert_allclose(boss.times.numpy() * 10, np.round(boss.times.numpy() * 10), atol=1e-9)
    assert boss.metadata["teacher_solver"] == "euler" and boss.metadata["coeff"] == 1.0
    with pytest.raises(OptimalStepsError, match="exceed its teacher grid"):
        make_schedule("boss", None, 11, model=mixture, noise=noise, teacher_steps=10)


def test_dm_objective_by_hand():
    def err(lam):  # sigma^2 / alpha at log-SNR lam
        alpha, sigma = 1 / math.sqrt(1 + math.exp(-2 * lam)), 1 / math.sqrt(1 + math.exp(2 * lam))
        return sigma ** 2 / alpha

    # one first-order step from lambda 0 to 1: (e - 1) * err(0) = (e - 1) / sqrt(2)
    assert dm_objective(np.array([0.0, 1.0]), order=1) == pytest.approx((math.e - 1) / math.sqrt(2))
    # three unit steps, second order in the middle: J0 = -e H1(1) = -e, J1 = e (H1(1) + H0(1)) = e^2
    lam = np.array([0.0, 1.0, 2.0, 3.0])
    e = math.e
    expected = (e - 1) * err(0) + math.hypot(-e * err(0), e ** 2 * err(1)) + (e ** 3 - e ** 2) * err(2)
    assert dm_objective(lam, order=2) == pytest.approx(expected)
    assert dm_objective(lam, order=1) == pytest.approx(sum((e ** (k + 1) - e ** k) * err(k) for k in range(3)))


def test_dm_two_steps_finds_the_minimum_of_its_bound():
    s = dm("ve", 2, solver="euler")
    lam_start, lam_end = -math.log(80), -math.log(0.002)
    grid = np.linspace(lam_start + 1e-3, lam_end - 1e-3, 20001)
    values = [dm_objective(np.array([lam_start, g, lam_end]), order=1) for g in grid]
    best = grid[int(np.argmin(values))]
    assert -math.log(float(s.times[1])) == pytest.approx(best, abs=2e-3)
    assert s.metadata["bound"] <= min(values) + 1e-6


def test_dm_schedule_shape_and_solver():
    for process in ("flow", "vp", "ve"):
        s = make_schedule("dm", process, 5, solver="dpmpp2m")
        assert s.solver == "dpmpp2m" and s.metadata["order"] == 2 and s.steps == 5
        assert s.times[0] == get_process(process).t_start and s.times[-1] == 0
        assert s.metadata["bound"] <= s.metadata["bound_init"] + 1e-9
    assert make_schedule("dm", "flow", 4).metadata["sigma_max"] == 80.0  # the flow start is infinite noise


# ------------------------------------------------------------------------------------ entry point


def test_oss_through_make_schedule():
    mixture = GaussianMixture.random(dim=3, components=2, seed=1, process="flow")
    s = make_schedule("oss", None, 3, model=mixture, samples=2, teacher_steps=10)
    assert s.steps == 3 and s.solver == "euler" and s.metadata["teacher_steps"] == 10


def test_entry_point_errors():
    with pytest.raises(OptimalStepsError, match=r"unknown schedule 'nope'; known: uniform.*gits"):
        make_schedule("nope", "flow", 3)
    with pytest.raises(OptimalStepsError, match="has no option.*bogus.*it takes: sigma_min, sigma_max, rho"):
        make_schedule("karras", "flow", 3, bogus=1)
    with pytest.raises(OptimalStepsError, match="searched on a model"):
        make_schedule("gits", "flow", 3)
    with pytest.raises(OptimalStepsError, match="steps must be a whole number >= 1"):
        make_schedule("uniform", "flow", 0)
    mixture = GaussianMixture.random(dim=2, components=1, process="vp")
    with pytest.raises(OptimalStepsError, match="does not match the model's 'vp'"):
        make_schedule("uniform", "flow", 3, model=mixture)
    assert {"ays-sd15", "oss-flux", "gits", "dm", "boss", "oss", "kl-optimal"} <= set(schedule_names())


def test_cli_schedule_command(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schedule", "karras", "--process", "ve", "--steps", "4", "--option", "rho=5", "--out", str(out)]) == 0
    saved = Schedule.load(out)
    assert saved.steps == 4 and saved.metadata["rho"] == 5
    assert main(["schedule", "karras", "--process", "ve", "--steps", "4", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["schedule", "ays", "--family", "flux", "--steps", "5"]) == 2
    assert "no table for model family 'flux'" in capsys.readouterr().err
    assert main(["schedule", "gits", "--steps", "3"]) == 2
    assert "pass a model" in capsys.readouterr().err
    assert main(["schedule", "boss", "--steps", "2", "--model", "gmm:dim=2,components=1", "--samples", "2",
                 "--option", "teacher_steps=6"]) == 0
    assert '"boss"' in capsys.readouterr().out
    assert main(["schedule", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in schedule_names())
