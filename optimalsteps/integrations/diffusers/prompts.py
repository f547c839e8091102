"""Prompts as a pipeline takes them: texts, or a dict of its own `*_embeds` (and mask) keyword arguments for
pipelines loaded without text encoders. Checked before any encoder or network runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...core.errors import OptimalStepsError
from .common import call_parameters


@dataclass
class Conditioning:
    texts: Optional[list[str]]
    embeds: dict[str, torch.Tensor]
    labels: Optional[list[int]]
    count: int  # prompts (or labels) before images_per_prompt repeats them


def negatives(negative_prompt: Any, count: int) -> Any:
    """One negative prompt for every prompt, as the pipelines broadcast it themselves."""
    return [negative_prompt] * count if isinstance(negative_prompt, str) else negative_prompt


def has_negative(c: Conditioning, negative_prompt: Any) -> bool:
    return negative_prompt is not None or "negative_prompt_embeds" in c.embeds


def text_conditioning(pipe: Any, prompts: Any, negative_prompt: Any, pooled: bool, same_shape: bool) -> Conditioning:
    """Texts (a string or list of strings) or a dict of the pipeline's embedding arguments."""
    if isinstance(prompts, dict):
        return embeddings(pipe, prompts, negative_prompt, pooled, same_shape)
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(p, str) for p in texts):
        raise OptimalStepsError("prompts must be a string, a non-empty list of strings, or a dict of embeddings")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise OptimalStepsError(f"this {type(pipe).__name__} has no text encoder: pass prompt embeddings "
                                "(a dict with prompt_embeds, ...) instead of texts")
    check_negative(negative_prompt, len(texts))
    return Conditioning(list(texts), {}, None, len(texts))


def check_negative(negative_prompt: Any, count: int) -> None:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise OptimalStepsError("negative_prompt must be a string or a list of strings")
    if len(negative_prompt) != count:
        raise OptimalStepsError(f"{len(negative_prompt)} negative prompts for {count} prompts")


def _allowed(pipe: Any) -> set[str]:
    # prompt_embeds, pooled ones, second encoders' (_2) and their masks
    return {name for name in call_parameters(pipe)
            if ("_embeds" in name or name.endswith("_attention_mask"))
            and not name.startswith(("ip_adapter", "negative_ip_adapter"))}


def embeddings(pipe: Any, embeds: dict, negative_prompt: Any, pooled: bool, same_shape: bool) -> Conditioning:
    """`same_shape`: the negative embeddings share one batched call with the positive ones."""
    allowed = _allowed(pipe)
    unknown = sorted(set(embeds) - allowed)
    if unknown:
        raise OptimalStepsError(f"unknown embedding(s) {unknown} for {type(pipe).__name__}; known: {sorted(allowed)}")
    required = ["prompt_embeds"] + (["pooled_prompt_embeds"] if pooled else [])
    missing = [name for name in required if embeds.get(name) is None]
    if missing:
        raise OptimalStepsError(f"{type(pipe).__name__} needs {', '.join(missing)} with prompt embeddings")
    if negative_prompt is not None:
        raise OptimalStepsError("give negative_prompt_embeds, not negative_prompt, together with prompt embeddings")
    given = {k: v for k, v in embeds.items() if v is not None}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise OptimalStepsError(f"{name} must be a tensor [B, ...]")
        if "mask" not in name and not value.is_floating_point():
            raise OptimalStepsError(f"{name} must be a floating-point tensor [B, ...]")
    count = given["prompt_embeds"].shape[0]
    for name, value in given.items():
        if value.shape[0] != count:
            raise OptimalStepsError(f"{name} has {value.shape[0]} rows but prompt_embeds has {count}")
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        negative = given.get(f"negative_{name}")
        if negative is not None and name in given and negative.shape != given[name].shape and same_shape:
            raise OptimalStepsError(f"negative_{name} has shape {list(negative.shape)} but {name} has "
                                    f"{list(given[name].shape)}")
    if pooled and ("negative_prompt_embeds" in given) != ("negative_pooled_prompt_embeds" in given):
        raise OptimalStepsError("give both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
    return Conditioning(None, given, None, count)


def check_unconditional(pipe: Any, c: Conditioning, cfg: bool) -> None:
    no_encoder = getattr(pipe, "text_encoder", None) is None
    if cfg and c.texts is None and "negative_prompt_embeds" not in c.embeds and no_encoder:
        raise OptimalStepsError("guidance needs negative_prompt_embeds: this pipeline has no text encoder "
                                "to encode the empty prompt")
