import json

import numpy as np
import pytest
import torch

from optimalsteps import OptimalStepsError, Schedule
from optimalsteps.core.processes import FLOW, VE, VP, DiscreteDDPM
from optimalsteps.core.schedules import loglinear_interp, uniform


def test_json_round_trip(tmp_path):
    s = Schedule([1.0, 0.7, 0.2, 0.0], "flow", solver="euler", metadata={"nfe": 12, "note": "x"})
    path = s.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["format"] == "optimalsteps.schedule.v1" and data["process"] == "flow"
    assert "library_version" in data["metadata"] and "created" in data["metadata"]
    back = Schedule.load(path)
    assert torch.equal(back.times, s.times) and back.solver == "euler" and back.metadata["nfe"] == 12
    with pytest.raises(OptimalStepsError, match="already exists"):
        s.save(path)
    s.save(path, overwrite=True)


@pytest.mark.parametrize("times,message", [
    ([1.0, 0.5, 0.6, 0.0], "not strictly decreasing at position 2"),
    ([1.0, 1.0, 0.0], "not strictly decreasing"),
    ([1.0, float("nan"), 0.0], "NaN or inf"),
    ([0.0], "at least 2 times"),
    ([1.5, 0.5, 0.0], "must lie in"),
    ([1.0, 0.5, 0.1], "must end at the clean end"),
])
def test_invalid_schedules(times, message):
    with pytest.raises(OptimalStepsError, match=message):
        Schedule(times, "flow")


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OptimalStepsError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"format": "optimalsteps.schedule.v1", "times": [1, 0]}))
    with pytest.raises(OptimalStepsError, match="missing key"):
        Schedule.load(tmp_path / "wrong.json")
    with pytest.raises(OptimalStepsError, match="not found"):
        Schedule.load(tmp_path / "absent.json")


def test_ve_process_with_own_sigma_max_round_trips(tmp_path):
    sd = DiscreteDDPM().ve_process()
    s = Schedule([float(sd.t_start), 3.0, 0.5, 0.0], sd)
    back = Schedule.load(s.save(tmp_path / "sd.json"))
    assert back.process.t_start == pytest.approx(sd.t_start)


def test_sigma_exports_round_trip():
    for process in (FLOW, VP, VE):
        s = uniform(process, 6)
        sig = s.to_sigmas()
        assert sig[-1] == 0 and len(sig) == 7
        back = Schedule.from_sigmas(sig, process)
        assert torch.allclose(back.times, s.times, rtol=1e-9, atol=1e-12)
    vp = uniform(VP, 4)
    assert torch.allclose(vp.to_sigmas(), VP.sigma(vp.times) / VP.alpha(vp.times))


def test_flow_sigmas_export():
    s = Schedule([1.0, 0.8, 0.3, 0.0], FLOW)
    assert torch.allclose(s.to_flow_sigmas(), torch.tensor([1.0, 0.8, 0.3], dtype=torch.float64))
    ve = s.in_process(VE)
    assert torch.allclose(ve.to_flow_sigmas()[1:], torch.tensor([0.8, 0.3], dtype=torch.float64))


def test_ddpm_timesteps_round_trip():
    ddpm = DiscreteDDPM()
    steps = torch.tensor([999, 800, 500, 200, 20])
    s = Schedule.from_timesteps(steps, ddpm)
    assert torch.equal(s.to_timesteps(ddpm), steps)
    assert s.times[-1] == 0 and s.steps == 5


def test_interpolation_matches_loglinear_definition():
    s = Schedule([1.0, 0.9, 0.6, 0.3, 0.1, 0.0], FLOW)
    out = s.interpolate(8)
    positive = s.to_sigmas()[:-1].numpy()
    xs_old, xs_new = np.linspace(0, 1, 5), np.linspace(0, 1, 8)
    expected = np.exp(np.interp(xs_new, xs_old, np.log(positive[::-1])))[::-1]
    assert np.allclose(out.to_sigmas()[:-1].numpy(), expected) and out.times[-1] == 0 and out.steps == 8
    assert np.allclose(loglinear_interp(np.array([4.0, 1.0]), 3), [4.0, 2.0, 1.0])
    assert torch.allclose(s.interpolate(5).times, s.times)


def test_denoise_truncation_keeps_the_low_noise_tail():
    s = Schedule([1.0, 0.9, 0.6, 0.3, 0.1, 0.0], FLOW)
    t = s.truncate(0.6)
    assert torch.equal(t.times, torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64))
    assert s.truncate(1.0).steps == 5 and s.truncate(0.01).steps == 1
    with pytest.raises(OptimalStepsError, match="denoise must be in"):
        s.truncate(0.0)


def test_in_process_round_trip():
    s = uniform(VP, 5)
    back = s.in_process(FLOW).in_process(VP)
    assert torch.allclose(back.times[1:], s.times[1:], rtol=1e-9, atol=1e-12)
