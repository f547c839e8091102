"""DiT: a class-conditional transformer on VE states. CFG batches [labels, null class] and guides only the
eps channels; learned-sigma channels are dropped, as the pipeline does. Its `__call__` takes no schedule."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ....core.errors import OptimalStepsError
from ..common import CallOptions, Guidance, device_of, per_sample, split_conditions
from ..family import Family, Request
from ..prompts import Conditioning
from ..tables import SigmaTable
from .sd import SD, UNetModel


class DiTModel(UNetModel):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        sigma = per_sample(t.to(torch.float32), x)
        out = self.net((x / (sigma**2 + 1) ** 0.5).to(self.net.dtype), timestep=self.table.timestep(t),
                       class_labels=cond["class_labels"]).sample
        return out[:, : self.net.config.in_channels]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        positive, _ = split_conditions(cond, x.shape[0])
        # the pipeline hard-codes ImageNet's null class 1000, which is the embedding table's extra row
        null = {"class_labels": torch.full_like(positive["class_labels"], self.net.config.num_embeds_ada_norm)}
        negative = null if self.guidance.scale > 1.0 else None
        return self.finish(self.guidance(self.forward, x, t, positive, negative), x, t)


class DiT(SD):
    name = "dit"
    label = "DiT (DiTTransformer2DModel)"
    denoisers = ("DiTTransformer2DModel",)
    denoiser = "transformer"
    custom_schedule = False
    batched_cfg = True

    def matches(self, components: dict[str, set[str]]) -> bool:
        return Family.matches(self, components)

    def vae_scale_factor(self, pipe: Any) -> int:
        vae = getattr(pipe, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = pipe.transformer.config.sample_size * self.vae_scale_factor(pipe)
        return size, size

    def size_rules(self, vae_scale_factor: int, net_config: Any) -> dict:
        return {"fixed": net_config["sample_size"] * vae_scale_factor}

    def guidance(self, pipe: Any, scale: float, options: CallOptions) -> str:
        return Family.guidance(self, pipe, scale, options)

    def conditioning(self, pipe: Any, prompts: Any, options: CallOptions) -> Conditioning:
        if options.negative_prompt is not None:
            raise OptimalStepsError("DiTPipeline has no negative prompt (its unconditional branch is the null class)")
        items = [prompts] if isinstance(prompts, (str, int, np.integer)) else prompts
        if not isinstance(items, (list, tuple)) or not items:
            raise OptimalStepsError("DiTPipeline prompts must be class ids or ImageNet label names")
        num_classes = pipe.transformer.config.num_embeds_ada_norm
        labels = []
        for item in items:
            if isinstance(item, str) and item.strip().isdigit():
                item = int(item)
            if isinstance(item, str):
                known = getattr(pipe, "labels", {}) or {}
                if item not in known:
                    raise OptimalStepsError(f"unknown class label {item!r} for this DiTPipeline")
                item = known[item]
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not 0 <= item < num_classes:
                raise OptimalStepsError(f"class id {item!r} is out of range for a DiT with {num_classes} classes")
            labels.append(int(item))
        return Conditioning(None, {}, labels, len(labels))

    def encode(self, pipe: Any, request: Request) -> dict[str, torch.Tensor]:
        labels = [label for label in request.conditioning.labels for _ in range(request.per_prompt)]
        return {"class_labels": torch.tensor(labels, dtype=torch.long, device=device_of(pipe))}

    def build(self, pipe: Any, request: Request, cond: dict) -> tuple[Any, torch.dtype]:
        config = pipe.transformer.config
        model = DiTModel(pipe.transformer, Guidance(request.scale, batched=True, positive_first=True),
                         (config.in_channels, config.sample_size, config.sample_size), request.spec,
                         SigmaTable.of(pipe.scheduler), pipe.scheduler.config.get("prediction_type", "epsilon"), None)
        return model, pipe.transformer.dtype

