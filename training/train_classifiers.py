"""Train the digit classifiers behind `optimalsteps.testbeds.nets.feature_extractor` (Fréchet distances), on CPU.

    python training/train_classifiers.py --dataset all

One small CNN per dataset on its fixed training split, with random one-pixel shifts as augmentation;
the held-out accuracy is printed and stored in optimalsteps/weights/classifier-DATASET.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from optimalsteps.testbeds.data import DATASETS, load_dataset
from optimalsteps.testbeds.nets import Classifier, save_weights
from train_digits import add_training_args, learning_rate, refuse_overwrite

OPTIONS = {
    "digits": {"widths": [32, 64], "feature_dim": 64, "num_classes": 10},
    "mnist": {"widths": [32, 64, 64], "feature_dim": 128, "num_classes": 10},
}
STEPS = {"digits": 1500, "mnist": 1000}  # the committed weights' runs


def shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by up to max_shift pixels in each direction, background (-1) filling the gap."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def accuracy(net: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(images).argmax(1) == labels).to(torch.float64).mean())


def train_one(dataset: str, steps: int, batch: int, lr: float, seed: int, out: str, force: bool) -> None:
    name = f"classifier-{dataset}"
    refuse_overwrite(name, out, force)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    torch.manual_seed(seed)
    options = OPTIONS[dataset]
    net = Classifier(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    started, recent = time.perf_counter(), []
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        index = torch.randint(len(train), (batch,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss = F.cross_entropy(net(shift(train.images[index], generator)), train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-100:]
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    net.eval()
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "final_train_loss": round(sum(recent) / len(recent), 6),
              "train_accuracy": round(accuracy(net, train.images, train.labels), 4),
              "heldout_accuracy": round(accuracy(net, test.images, test.labels), 4),
              "heldout_size": len(test), "seconds": round(time.perf_counter() - started, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "script": "training/train_classifiers.py"}
    meta = {"architecture": "classifier", "options": options, "dataset": dataset, "num_classes": 10,
            "training": record}
    path = save_weights(name, net, meta, out, overwrite=force)
    print(f"{name}: final train loss {record['final_train_loss']:.4f}, held-out accuracy "
          f"{record['heldout_accuracy']:.4f} on {len(test)} images; wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    add_training_args(parser, steps=None, batch=128, lr=3e-3, steps_help="default: 1500 for digits, 1000 for mnist")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for dataset in (DATASETS if args.dataset == "all" else [args.dataset]):
        train_one(dataset, args.steps or STEPS[dataset], args.batch, args.lr, args.seed, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
