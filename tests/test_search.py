import functools
import itertools
import math

import pytest
import torch

from optimalsteps import AmplitudeCalibration, GaussianMixture, OptimalStepsError, Schedule, sample
from optimalsteps import search as any_search
from optimalsteps.core.schedules import uniform
from optimalsteps.core.models import default_teacher_grid
from optimalsteps.optimize.options import DPOptions

# these tests check the paper's plain DP: they call it by name
search = functools.partial(any_search, method="dp")


def _final_error(model, noise, teacher_out, times, solver):
    return (sample(model, noise, times, solver=solver).samples - teacher_out).pow(2).mean().item()


def _brute_force(model, noise, result, steps, solver):
    """Realised final error of every exactly-M-step path on the teacher grid."""
    grid = result.teacher.times
    n = len(grid) - 1
    errors = {}
    for inner in itertools.combinations(range(1, n), steps - 1):
        path = (0,) + inner + (n,)
        errors[path] = _final_error(model, noise, result.teacher_samples, grid[list(path)], solver)
    return errors


@pytest.mark.parametrize("process", ["flow", "vp", "ve"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp2m", "heun"])
def test_dp_against_brute_force_on_a_tiny_grid(process, solver):
    model = GaussianMixture.random(dim=6, components=3, seed=4, process=process)
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2, 3, 4):
        result = search(model, noise, steps=steps, teacher_steps=12, solver=solver, dp=DPOptions(candidates=12))
        path = tuple(result.indices)
        # exactly M strictly decreasing steps from the teacher's start to the clean end
        assert len(path) == steps + 1 and path[0] == 0 and path[-1] == 12
        assert all(b > a for a, b in zip(path, path[1:]))
        assert torch.equal(result.schedule.times, result.teacher.times[list(path)])
        realised = _final_error(model, noise, result.teacher_samples, result.schedule, solver)
        assert realised == pytest.approx(result.dp_cost, rel=1e-6, abs=1e-12)
        if steps <= 2:  # one state per cell loses nothing here: the DP is the brute-force optimum
            errors = _brute_force(model, noise, result, steps, solver)
            assert realised == pytest.approx(min(errors.values()), rel=1e-6, abs=1e-12)


def test_dp_is_never_better_than_the_brute_force_optimum_for_larger_m():
    model = GaussianMixture.random(dim=6, components=3, seed=4, process="flow")
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = search(model, noise, steps=4, teacher_steps=12)
    errors = _brute_force(model, noise, result, 4, "euler")
    assert min(errors.values()) <= result.dp_cost * (1 + 1e-9)
    assert errors[tuple(result.indices)] == pytest.approx(result.dp_cost, rel=1e-6)


def test_joint_with_one_sample_equals_per_sample():
    model = GaussianMixture.random(dim=8, components=4, seed=0, process="vp")
    noise = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    for solver in ("euler", "dpmpp2m"):
        joint = search(model, noise, steps=4, teacher_steps=30, solver=solver, dp=DPOptions(aggregate="joint"))
        median = search(model, noise, steps=4, teacher_steps=30, solver=solver, dp=DPOptions(aggregate="median"))
        assert joint.indices == median.indices == median.per_sample_indices[0]
        assert joint.dp_cost == pytest.approx(median.dp_cost)


def test_median_aggregation_and_per_sample_schedules():
    model = GaussianMixture.random(dim=8, components=4, seed=0)
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    result = search(model, noise, steps=4, teacher_steps=30, dp=DPOptions(aggregate="median"))
    table = torch.tensor(result.per_sample_indices)
    assert result.indices == table.median(dim=0).values.tolist()  # odd count: the true median
    assert len(result.per_sample) == 5 and all(s.steps == 4 for s in result.per_sample)
    assert result.cost_table.shape == (5, 5, 31)


def test_costs_metadata_nfe_and_determinism():
    model = GaussianMixture.random(dim=8, components=4, seed=0)
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    a = search(model, noise, steps=3, teacher_steps=20, seed=7)
    b = search(model, noise, steps=3, teacher_steps=20, seed=7)
    assert a.indices == b.indices and a.dp_cost == b.dp_cost
    meta = a.schedule.metadata
    for key in ("nfe", "search_seconds", "teacher_steps", "solver", "cost", "aggregate", "samples", "seed"):
        assert key in meta
    # teacher: 20 per sample; layers: 1 source, then the reachable cells 1..18 and 2..19
    assert a.nfe == 4 * 20 + 4 * (1 + 18 + 18) == meta["nfe"]
    assert a.cost_table.shape == (4, 21) and a.cost_table[3, 20] == pytest.approx(a.dp_cost)
    # x0 cost with a single candidate re-ranks nothing: the xt schedule, at the price of the extra calls
    x0_one = search(model, noise, steps=3, teacher_steps=20, dp=DPOptions(cost="x0", candidates=1))
    assert x0_one.indices == a.indices
    x0 = search(model, noise, steps=3, teacher_steps=20, dp=DPOptions(cost="x0", candidates=4))
    assert x0.schedule.metadata["cost"] == "x0" and x0.nfe > a.nfe


def test_reference_compat_starts_anywhere_and_pads():
    # (a) the first step may start from the raw noise placed at a later grid point
    starts = []
    for seed in range(4):
        model = GaussianMixture.random(dim=16, components=6, seed=seed)
        noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
        ref = search(model, noise, steps=4, teacher_steps=40, dp=DPOptions(reference_compat=True))
        starts += [p[0] for p in ref.per_sample_indices]
        exact = search(model, noise, steps=4, teacher_steps=40)
        assert exact.indices[0] == 0 and exact.schedule.steps == 4
    assert max(starts) > 0
    model = GaussianMixture.random(dim=16, components=6, seed=0)
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    ref = search(model, noise, steps=4, teacher_steps=40, dp=DPOptions(reference_compat=True))
    if ref.indices[0] > 0:
        assert ref.schedule.metadata["noise_scale_time"] == 1.0
        first = sample(model, noise, ref.schedule).samples
        assert torch.isfinite(first).all()

    # (b) "at most k steps": a one-step path that is already exact is never replaced, so the traced
    # schedule is padded with repeated start indices (zero-length steps in the released code)
    class ConstantX0:
        process, prediction, sample_shape = "flow", "x0", (4,)

        def __call__(self, x, t):
            return torch.zeros_like(x)

    const = ConstantX0()
    noise = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = search(const, noise, steps=3, teacher_steps=10, dp=DPOptions(reference_compat=True))
    assert ref.schedule.metadata["reference_indices"] == [0, 0, 0, 10]
    assert ref.schedule.metadata["padded_steps"] == 2 and ref.schedule.steps == 1
    exact = search(const, noise, steps=3, teacher_steps=10)
    assert exact.schedule.steps == 3


def test_reference_median_is_the_released_integer_statistic():
    from optimalsteps.optimize.dp import reference_median as _reference_median

    # released: sort in its own order (clean end = 0) and take (l[n//2] + l[n//2 - 1]) // 2
    per_sample = [[0, 3, 10], [0, 4, 10], [0, 8, 10]]
    # their indices of the middle position: 7, 6, 2 -> sorted 2, 6, 7 -> (6 + 2) // 2 = 4 -> ours 6
    assert _reference_median(per_sample) == [0, 6, 10]


def test_calibration_statistics_and_transform():
    model = GaussianMixture.random(dim=32, components=4, seed=0)
    noise = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    result = search(model, noise, steps=3, teacher_steps=20)
    cal = AmplitudeCalibration.from_schedule(result.schedule, "affine")
    assert len(cal.q05) == 3 and cal.q05[0] < 0 < cal.q95[0]
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5)) * 3 + 1
    y = cal(x, 1, 0.5)
    q = torch.quantile(y, torch.tensor([0.05, 0.95]), dim=1)
    assert torch.allclose(q[0], torch.full((4,), cal.q05[1]), atol=1e-4)
    assert torch.allclose(q[1], torch.full((4,), cal.q95[1]), atol=1e-4)
    scaled = AmplitudeCalibration.from_schedule(result.schedule, "scale")(x, 1, 0.5)
    qs = torch.quantile(scaled, torch.tensor([0.05, 0.95]), dim=1)
    assert torch.allclose(qs[1] - qs[0], torch.full((4,), cal.q95[1] - cal.q05[1]), atol=1e-4)
    out = sample(model, noise, result.schedule, calibration=cal)
    assert torch.isfinite(out.samples).all()


def test_default_teacher_grids():
    model = GaussianMixture.random(dim=2, components=1, seed=0, process="ve")
    grid = default_teacher_grid(model.process, 10)
    assert grid.times[0] == 80 and grid.times[-2] == pytest.approx(0.002) and grid.times[-1] == 0
    assert torch.allclose(default_teacher_grid(GaussianMixture.random(2, 1).process, 4).times,
                          uniform("flow", 4).times)


class _NanAfter:
    process, prediction, sample_shape = "flow", "velocity", (3,)

    def __init__(self, bad_time):
        self.bad_time = bad_time

    def __call__(self, x, t):
        out = torch.zeros_like(x)
        out[t <= self.bad_time] = float("nan")
        return out


def test_bad_inputs():
    model = GaussianMixture.random(dim=3, components=2, seed=0)
    noise = torch.randn(2, 3)
    cases = [
        (dict(steps=10, teacher_steps=10), "must be fewer than the teacher's steps"),
        (dict(steps=0), "steps must be a whole number >= 1"),
        (dict(steps=2, dp=dict(cost="l1")), "unknown cost 'l1'"),
        (dict(steps=2, dp=dict(aggregate="mean")), "unknown aggregate 'mean'"),
        (dict(steps=2, solver="rk4"), "unknown solver 'rk4'"),
        (dict(steps=2, solver="heun", dp=dict(reference_compat=True)), "supports only the euler solver"),
        (dict(steps=2, cond={"labels": torch.zeros(3)}), "has 3 rows but there are 2 noise samples"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OptimalStepsError, match=message):
            if "dp" in kwargs:
                kwargs["dp"] = DPOptions(**kwargs["dp"])
            search(model, noise, teacher_steps=kwargs.pop("teacher_steps", 20), **kwargs)
    with pytest.raises(OptimalStepsError, match="at least one sample"):
        search(model, torch.zeros(0, 3), steps=2, teacher_steps=10)
    with pytest.raises(OptimalStepsError, match="not strictly decreasing"):
        search(model, noise, steps=2, teacher_grid=Schedule([1.0, 0.4, 0.5, 0.0], "flow"))
    with pytest.raises(OptimalStepsError, match=r"teacher step 7 of 10: model returned NaN/inf at t=0\.4"):
        search(_NanAfter(0.4), noise, steps=2, teacher_steps=10)
    with pytest.raises(OptimalStepsError, match=r"search layer 2: model returned NaN/inf"):
        search(_OnlyTeacher(), noise, steps=2, teacher_steps=10)


class _OnlyTeacher:
    """Finite during the teacher (one state per sample), NaN once the search batches many states."""

    process, prediction, sample_shape = "flow", "velocity", (3,)

    def __call__(self, x, t):
        out = torch.zeros_like(x)
        if x.shape[0] > 2:
            out[:] = float("nan")
        return out


@pytest.mark.parametrize("solver", ["euler", "dpmpp2m"])
def test_free_start_against_brute_force(solver):
    """With free_start the first step may start from the initial state placed at any grid point: the
    traced schedule's realised error is the DP's cost; for M = 1 it is the optimum over all such paths, and
    from M = 2 on the first layer's cells already prune between starts, so it is only bounded by it."""
    model = GaussianMixture.random(dim=6, components=3, seed=4, process="flow")
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2, 3):
        result = search(model, noise, steps=steps, teacher_steps=12, solver=solver, dp=DPOptions(free_start=True))
        realised = _final_error(model, noise, result.teacher_samples, result.schedule, solver)
        assert realised == pytest.approx(result.dp_cost, rel=1e-6, abs=1e-12)
        if result.indices[0] > 0:
            assert result.schedule.metadata["noise_scale_time"] == 1.0
        fixed = search(model, noise, steps=steps, teacher_steps=12, solver=solver)
        assert result.dp_cost <= fixed.dp_cost * (1 + 1e-9)  # a superset of paths
        if steps <= 2:
            grid = result.teacher.times
            best = math.inf
            for path in itertools.combinations(range(0, 12), steps):
                times = grid[list(path) + [12]]
                schedule = Schedule(times, "flow", metadata={"noise_scale_time": 1.0})
                best = min(best, _final_error(model, noise, result.teacher_samples, schedule, solver))
            assert best <= realised * (1 + 1e-9)
            if steps == 1:
                assert realised == pytest.approx(best, rel=1e-6, abs=1e-12)
