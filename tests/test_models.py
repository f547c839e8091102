import pytest
import torch

from optimalsteps import CFGModel, OptimalStepsError, load_model, predict_x0


class _Linear:
    process, prediction = "flow", "x0"

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, labels=None):
        self.calls.append(x.shape[0])
        return x * 0 + labels.to(x.dtype)[:, None]


def test_cfg_combines_conditional_and_unconditional_in_one_call():
    inner = _Linear()
    model = CFGModel(inner, guidance_scale=3.0, uncond_value=10)
    out = model(torch.zeros(2, 3), torch.full((2,), 0.5), labels=torch.tensor([1, 2]))
    # uncond + 3 (cond - uncond) = 10 + 3 (c - 10)
    assert torch.allclose(out, torch.tensor([[-17.0] * 3, [-14.0] * 3]))
    assert inner.calls == [4]
    assert CFGModel(inner, 1.0, uncond_value=10)(torch.zeros(1, 3), torch.zeros(1), labels=torch.tensor([5]))[0, 0] == 5


def test_predict_x0_hands_times_in_the_models_time_dtype():
    class Seen:
        process, prediction, time_dtype = "flow", "x0", None

        def __call__(self, x, t):
            self.t = t
            return x

    model, x = Seen(), torch.ones(2, 3)
    predict_x0(model, x, torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert model.t.dtype == torch.float32  # the state's dtype by default
    model.time_dtype = torch.float64  # e.g. a pipeline truncating float64 sigmas to integer timesteps
    predict_x0(model, x, torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert model.t.dtype == torch.float64 and float(model.t[0]) == 0.1
    assert CFGModel(model, 2.0, uncond_value=0).time_dtype == torch.float64


def test_python_model_spec(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "class M:\n    process = 'vp'\n    prediction = 'eps'\n    sample_shape = (2,)\n"
        "    def __call__(self, x, t):\n        return torch.zeros_like(x)\n"
        "def make():\n    return M()\n")
    model = load_model(f"python:{tmp_path / 'm.py'}:make")
    x0 = predict_x0(model, torch.ones(1, 2), torch.tensor([0.5]))
    assert torch.allclose(x0, torch.ones(1, 2) / model_alpha(0.5))
    with pytest.raises(OptimalStepsError, match="has no callable 'nope'"):
        load_model(f"python:{tmp_path / 'm.py'}:nope")
    with pytest.raises(OptimalStepsError, match="not found"):
        load_model("python:/no/such.py:make")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(OptimalStepsError, match="could not import .*boom"):
        load_model(f"python:{tmp_path / 'broken.py'}:make")
    (tmp_path / "bad.py").write_text("class M:\n    process = 'flow'\n    prediction = 'score'\ndef make():\n    return M()\n")
    with pytest.raises(OptimalStepsError, match="unknown prediction type 'score'"):
        load_model(f"python:{tmp_path / 'bad.py'}:make")


def model_alpha(t):
    from optimalsteps.core.processes import VP
    return float(VP.alpha(torch.tensor(t, dtype=torch.float64)))


def test_unknown_model_lists_known_ones():
    with pytest.raises(OptimalStepsError, match="unknown model 'nosuch'; known: gmm"):
        load_model("nosuch")
