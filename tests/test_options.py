"""The search's option objects, refused overrides, the honest result, and the shared plumbing they use
(the model's teacher grid, one condition rule, chunked sampling, exact conversions)."""

import json

import pytest
import torch

from optimalsteps import (GaussianMixture, OptimalStepsError, Schedule, compare, draw_noise, make_schedule, sample,
                          search)
from optimalsteps.cli import main
from optimalsteps.core.errors import unknown
from optimalsteps.core.models import check_cond, default_teacher_grid, index_cond, model_teacher_grid
from optimalsteps.core.processes import FLOW, VE, convert_times
from optimalsteps.optimize.options import Checkpointing, CostView, DPOptions, Storage, from_flat
from optimalsteps.optimize.refine import final_error


def _model(process="flow"):
    return GaussianMixture.random(dim=6, components=3, seed=4, process=process)


def _noise(count=4):
    return torch.randn(count, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("options,refused", [(dict(cost="x0"), "cost x0"), (dict(aggregate="joint"), "aggregate joint"),
                                             (dict(free_start=True), "free start"),
                                             (dict(coarse_to_fine=True), "coarse to fine")])
def test_reference_compat_refuses_what_it_would_override(options, refused):
    with pytest.raises(OptimalStepsError, match=f"cannot honour: {refused}"):
        DPOptions(reference_compat=True, **options)
    DPOptions(reference_compat=True, aggregate="median", cost="xt")  # what it runs anyway is accepted


def test_reference_compat_metadata_records_what_ran():
    result = search(_model(), _noise(), steps=3, teacher_steps=12, dp=DPOptions(reference_compat=True))
    meta = result.schedule.metadata
    assert meta["cost"] == "xt" and meta["aggregate"] == "median" and meta["free_start"] is False
    assert meta["reference_compat"] is True


def test_cli_refuses_reference_compat_with_joint_in_one_line(tmp_path, capsys):
    code = main(["search", "--model", "gmm:dim=4,components=2", "--steps", "2", "--teacher-steps", "8", "--samples",
                 "2", "--reference-compat", "--aggregate", "joint", "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot honour: aggregate joint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


def test_error_is_the_returned_schedules_realised_error_and_differs_from_the_median_dp_cost():
    model, noise = _model(), _noise(5)
    result = search(model, noise, steps=2, teacher_steps=16, dp=DPOptions(aggregate="median"), method="dp")
    realised, calls = final_error(model, noise, result.schedule, "euler", result.teacher_samples)
    assert result.error == pytest.approx(realised, rel=1e-12)  # float64 on both sides
    meta = result.schedule.metadata
    assert meta["error"] == result.error and meta["error_nfe"] == calls == 5 * 2
    assert meta["nfe"] == result.nfe  # the error run is counted apart
    # for M <= 2 each per-sample DP finds its sample's optimum, so their mean (the median DP's cost) is at
    # most the shared median schedule's error, and here strictly below it
    assert result.dp_cost < result.error
    joint = search(model, noise, steps=3, teacher_steps=16, method="dp")
    assert joint.error == pytest.approx(joint.dp_cost, rel=1e-9)  # joint xt: the same quantity


def test_options_objects_check_their_values():
    with pytest.raises(OptimalStepsError, match="unknown storage 'tape'"):
        Storage("tape")
    with pytest.raises(OptimalStepsError, match="max_batch must be a whole number"):
        Storage(max_batch=0)
    with pytest.raises(OptimalStepsError, match="--resume needs the --checkpoint"):
        Checkpointing(resume=True)
    with pytest.raises(OptimalStepsError, match="candidates must be at least 1"):
        DPOptions(candidates=0)
    assert Storage(dtype="bfloat16").dtype == torch.bfloat16


def test_flat_options_become_objects():
    out = from_flat({"cost": "x0", "cost_frames": [1], "storage_dir": "d", "storage": "disk", "resume": False,
                     "checkpoint_dir": "c", "seed": 3})
    assert out["dp"] == DPOptions(cost="x0", view=CostView(frames=[1]))
    assert out["storage"] == Storage("disk", dir="d") and out["checkpointing"] == Checkpointing("c")
    assert out["seed"] == 3
    with pytest.raises(OptimalStepsError, match="not both"):
        from_flat({"cost": "x0", "dp": DPOptions()})
    s = make_schedule("oss", None, 2, model=_model(), samples=2, teacher_steps=8, aggregate="median")
    assert s.metadata["aggregate"] == "median"


def test_the_models_teacher_grid_is_read_by_search_and_compare():
    class OwnGrid(GaussianMixture):
        def teacher_grid(self, teacher_steps):
            return Schedule(torch.linspace(1, 0, teacher_steps + 1, dtype=torch.float64) ** 2, "flow")

    model = _model()
    own = OwnGrid(model.weights, model.means, model.stds, model.process)
    grid = model_teacher_grid(own, 10)
    assert torch.equal(grid.times, torch.linspace(1, 0, 11, dtype=torch.float64) ** 2)
    assert torch.equal(model_teacher_grid(model, 10).times, default_teacher_grid(model.process, 10).times)
    result = search(own, _noise(), steps=2, teacher_steps=10, method="dp")
    assert torch.equal(result.teacher.times, grid.times)
    row = compare(own, steps=[2], schedules=["uniform"], samples=2, eval_samples=4, teacher_steps=10).rows[0]
    eval_noise = draw_noise(own, 4, 1_000_003)
    teacher = sample(own, eval_noise, grid).samples
    out = sample(own, eval_noise, make_schedule("uniform", "flow", 2)).samples
    assert row["mse"] == pytest.approx(float((out.double() - teacher.double()).pow(2).mean()), rel=1e-9)


def test_one_condition_rule():
    labels = torch.arange(4)
    assert check_cond({"labels": labels, "shared": torch.zeros(1, 3), "scale": 2.0}, 4) is not None
    with pytest.raises(OptimalStepsError, match="has 3 rows but there are 4 noise samples"):
        check_cond({"labels": torch.arange(3)}, 4)
    picked = index_cond({"labels": labels, "shared": torch.zeros(1, 3)}, torch.tensor([2, 3]))
    assert picked["labels"].tolist() == [2, 3] and picked["shared"].shape == (1, 3)


def test_sample_in_chunks_is_the_same_and_broadcasts_one_row_conditions():
    model, noise = _model(), _noise(5)
    schedule = make_schedule("karras", "flow", 4)
    whole = sample(model, noise, schedule, solver="heun", return_trajectory=True)
    parts = sample(model, noise, schedule, solver="heun", return_trajectory=True, max_batch=2)
    # chunks change the matrix shapes the BLAS sees, so the sums may round differently: equal to the dtype's eps
    tol = 64 * torch.finfo(whole.samples.dtype).eps
    assert torch.allclose(whole.samples, parts.samples, rtol=tol, atol=tol) and whole.nfe == parts.nfe
    assert all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(whole.trajectory, parts.trajectory))

    class Labelled:
        process, prediction = "flow", "x0"

        def __call__(self, x, t, labels):
            return torch.zeros_like(x) + labels.reshape(-1, 1).to(x.dtype)

    one = sample(Labelled(), noise, schedule, cond={"labels": torch.tensor([3])}).samples
    assert torch.equal(one, torch.full_like(one, 3.0))


def test_conversions_within_a_process_are_exact_and_files_carry_no_float_noise(tmp_path):
    flow = make_schedule("oss-flux", "flow", 10)
    assert flow.times[1].item() == 0.9886
    times = torch.tensor([0.9886, 0.3], dtype=torch.float64)
    assert torch.equal(convert_times(times, FLOW, FLOW), times)
    assert torch.equal(convert_times(torch.tensor([100.0, 5.0]), VE, VE), torch.tensor([80.0, 5.0], dtype=torch.float64))
    path = make_schedule("uniform", "flow", 10).save(tmp_path / "u.json")
    assert json.loads(path.read_text())["times"][7] == 0.3  # not 0.30000000000000004


def test_unknown_names_one_helper():
    assert str(unknown("solver", "rk4", ["euler", "heun"])) == "unknown solver 'rk4'; known: euler, heun"
