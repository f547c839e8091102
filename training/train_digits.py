"""Train the shipped 8x8 digit models: `digits-flow` (velocity) and `digits-vp` (eps), on CPU.

    python training/train_digits.py --model flow      # or vp, or all
    python training/train_digits.py --model all --force   # replace the committed weights

Seeded and reproducible for a given seed and thread count; writes optimalsteps/weights/NAME.{safetensors,json}.
`train_diffusion` is the loop shared with train_mnist.py.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from optimalsteps.testbeds.data import load_dataset
from optimalsteps.testbeds.nets import UNet, diffusion_loss, save_weights, WEIGHTS_DIR
from optimalsteps.core.processes import get_process

# name -> (process, prediction, UNet options)
DIGITS_MODELS = {
    "flow": ("digits-flow", "flow", "velocity", {"base_channels": 32, "channel_mults": [1, 2], "emb_dim": 64}),
    "vp": ("digits-vp", "vp", "eps", {"base_channels": 32, "channel_mults": [1, 2], "emb_dim": 64}),
}
T_MIN = {"flow": 0.0, "vp": 1e-4}  # VP at t = 0 has sigma = 0, where eps is not defined by x_t


def training_times(batch: int, t_min: float, generator: torch.Generator) -> torch.Tensor:
    """Stratified uniform times in [t_min, 1]: one per 1/batch slot, a lower-variance loss than iid draws."""
    u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(batch, dtype=torch.float64)) / batch
    return t_min + (1.0 - t_min) * u[torch.randperm(batch, generator=generator)]


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def update_ema(ema: torch.nn.Module, net: torch.nn.Module, step: int, decay: float) -> None:
    # the early ramp keeps the average from remembering the random initialisation
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p, 1.0 - d)


def heldout_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, process: str,
                 prediction: str, t_min: float, seed: int, batch: int = 512) -> float:
    """The loss on held-out images with fixed noise and times (comparable between runs)."""
    generator = torch.Generator().manual_seed(seed + 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x0 = images[i:i + batch]
            t = training_times(x0.shape[0], t_min, generator)
            noise = torch.randn(x0.shape, generator=generator)
            y = None if labels is None else labels[i:i + batch]
            total += float(diffusion_loss(net, x0, t, noise, process, prediction, y)) * x0.shape[0]
            count += x0.shape[0]
    return total / count


def train_diffusion(net: torch.nn.Module, images: torch.Tensor, process: str, prediction: str, steps: int,
                    batch: int, lr: float, seed: int, labels: torch.Tensor | None = None, num_classes: int = 0,
                    label_dropout: float = 0.0, ema_decay: float = 0.999, desc: str = "training") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `net` on images [N, C, H, W]; returns the EMA network and a record of the run.

    With labels, each is replaced by the null class `num_classes` with probability `label_dropout`
    (classifier-free guidance needs the unconditional model too).
    """
    generator = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    t_min = T_MIN[get_process(process).kind]
    started, recent = time.perf_counter(), []
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        index = torch.randint(images.shape[0], (batch,), generator=generator)
        x0 = images[index]
        t = training_times(batch, t_min, generator)
        noise = torch.randn(x0.shape, generator=generator)
        y = None
        if labels is not None:
            drop = torch.rand(batch, generator=generator) < label_dropout
            y = torch.where(drop, torch.full_like(labels[index], num_classes), labels[index])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss = diffusion_loss(net, x0, t, noise, process, prediction, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, net, step, ema_decay)
        recent = (recent + [loss.item()])[-200:]  # the final loss is the mean of the last 200 steps
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "ema_decay": ema_decay,
              "label_dropout": label_dropout, "t_min": t_min, "final_train_loss": round(sum(recent) / len(recent), 6),
              "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version()}
    return ema, record


def refuse_overwrite(name: str, out: str, force: bool) -> None:
    """Fail before training, not after, when the weight files exist and --force was not given."""
    existing = [p for p in (Path(out) / f"{name}.safetensors", Path(out) / f"{name}.json") if p.exists()]
    if existing and not force:
        raise SystemExit(f"{existing[0]} already exists; pass --force to overwrite")


def train_one(key: str, steps: int, batch: int, lr: float, seed: int, out: str, force: bool) -> None:
    name, process, prediction, options = DIGITS_MODELS[key]
    refuse_overwrite(name, out, force)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(seed)
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    ema, record = train_diffusion(net, train.images, process, prediction, steps, batch, lr, seed, desc=name)
    record["heldout_loss"] = round(heldout_loss(ema, test.images, None, process, prediction, record["t_min"], seed), 6)
    record["script"] = "training/train_digits.py"
    meta = {"architecture": "unet", "options": options, "dataset": "digits", "process": process,
            "prediction": prediction, "num_classes": 0, "training": record}
    path = save_weights(name, ema, meta, out, overwrite=force)
    print(f"{name}: final train loss {record['final_train_loss']:.4f}, held-out loss {record['heldout_loss']:.4f}, "
          f"{record['seconds']:.0f}s; wrote {path}")


def add_training_args(parser: argparse.ArgumentParser, steps: int | None, batch: int, lr: float,
                      steps_help: str | None = None) -> None:
    """The options every training script shares (their defaults differ)."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="directory for the weight files")
    parser.add_argument("--force", action="store_true", help="overwrite existing weight files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*DIGITS_MODELS, "all"], default="all")
    add_training_args(parser, steps=2000, batch=128, lr=2e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for key in (DIGITS_MODELS if args.model == "all" else [args.model]):
        train_one(key, args.steps, args.batch, args.lr, args.seed, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
