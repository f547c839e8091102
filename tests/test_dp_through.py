"""`DPOptions.through`: the plain DP constrained to pass a teacher grid point after a given number of steps."""

from __future__ import annotations

import pytest
import torch

from optimalsteps import GaussianMixture, OptimalStepsError, sample
from optimalsteps.optimize.options import DPOptions
from optimalsteps.optimize.search import search


def _error(model, noise, teacher_out, times, solver):
    return (sample(model, noise, times, solver=solver).samples - teacher_out).pow(2).mean().item()


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m", "unipc"])
def test_the_schedule_passes_the_point_and_its_cost_is_realised(solver):
    model = GaussianMixture.random(dim=6, components=3, seed=4, process="flow")
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    free = search(model, noise, steps=3, teacher_steps=12, solver=solver, method="dp")
    for k, j in ((1, 2), (2, 9), (1, 10)):
        result = search(model, noise, steps=3, teacher_steps=12, solver=solver, dp=DPOptions(through=(k, j)))
        assert result.indices[k] == j and result.indices[0] == 0 and result.indices[-1] == 12
        realised = _error(model, noise, result.teacher_samples, result.schedule, solver)
        assert realised == pytest.approx(result.dp_cost, rel=1e-6, abs=1e-12)
    # constrained to a point the free DP passes anyway, the DP takes the same path
    pinned = search(model, noise, steps=3, teacher_steps=12, solver=solver,
                    dp=DPOptions(through=(2, free.indices[2])))
    assert pinned.indices == free.indices and pinned.dp_cost == pytest.approx(free.dp_cost, rel=1e-12)


def test_through_is_checked():
    model = GaussianMixture.random(dim=6, components=3, seed=4, process="flow")
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for bad in ((0, 3), (3, 3), (1, 12), (2, 1), (1, 11)):
        with pytest.raises(OptimalStepsError, match="through"):
            search(model, noise, steps=3, teacher_steps=12, dp=DPOptions(through=bad))
    with pytest.raises(OptimalStepsError, match="through must be"):
        DPOptions(through=(1,))
    with pytest.raises(OptimalStepsError, match="plain DP|through"):
        search(model, noise, steps=3, teacher_steps=12, dp=DPOptions(through=(1, 3)), method="validated")
