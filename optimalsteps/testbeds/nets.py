"""Small networks trained here on real digit images, shipped with their weights.

- `digits-flow`: flow matching on 8x8 digits, velocity prediction (eps - x0), flow time t in [0, 1].
- `digits-vp`: VP (linear beta 0.1..20) on 8x8 digits, eps prediction, continuous t in [0, 1].
- `mnist-flow-cfg`: class-conditional flow matching on 28x28 MNIST, sampled with classifier-free
  guidance; the unconditional label is the null class `num_classes` (trained with label dropout).

One small classifier per dataset gives `feature_extractor(dataset)`: images -> feature vectors for
Fréchet distances (Inception features cannot be had offline).

Weights live in `optimalsteps/weights/NAME.safetensors` beside `NAME.json` (architecture, training
record, and the sha256 of the weight file, checked before loading). The training scripts under
`training/` write both with `save_weights`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from .data import dataset_info, draw_images, load_dataset
from ..core.errors import OptimalStepsError, unknown
from ..core.io import load_json, write_bytes, write_text
from ..core.models import CFGModel
from ..core.processes import ProcessLike, from_x0_eps, get_process

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FORMAT = "optimalsteps.weights.v1"
DEFAULT_GUIDANCE = 2.0


# ---------------------------------------------------------------------------------- architecture

def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of times t [B] in [0, 1] (scaled by 1000, as DDPM's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding entering as a scale and shift after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class UNet(nn.Module):
    """A small UNet: one ResBlock per level going down, two coming up (one per skip), two in the middle.

    `num_classes > 0` adds a label embedding with one extra row, the null (unconditional) class.
    """

    def __init__(self, image_channels: int = 1, base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2),
                 emb_dim: int = 64, num_classes: int = 0):
        super().__init__()
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(image_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        skip_widths = [base_channels]
        width = base_channels
        for level, out in enumerate(widths):
            self.down.append(ResBlock(width, out, emb_dim))
            width = out
            skip_widths.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.mid = nn.ModuleList([ResBlock(width, width, emb_dim), ResBlock(width, width, emb_dim)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(2):
                self.up.append(ResBlock(width + skip_widths.pop(), widths[level], emb_dim))
                width = widths[level]
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(time_features(t, self.emb_dim))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Classifier(nn.Module):
    """A small CNN: strided convs, global average pooling, one hidden layer whose activations are the features."""

    def __init__(self, image_channels: int = 1, widths: tuple[int, ...] = (32, 64), feature_dim: int = 64,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = image_channels
        for i, out in enumerate(widths):
            # the first conv keeps the resolution, the later ones halve it
            layers += [nn.Conv2d(width, out, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.hidden(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"unet": UNet, "classifier": Classifier}


def build_network(architecture: str, options: dict[str, Any]) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise unknown("architecture", architecture, ARCHITECTURES)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return ARCHITECTURES[architecture](**options)
    except TypeError as exc:
        raise OptimalStepsError(f"bad {architecture} options {options}: {exc}") from None


def diffusion_loss(net: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, process: ProcessLike,
                   prediction: str, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the network's output against the `prediction` target at x_t = alpha x0 + sigma noise."""
    process = get_process(process)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    alpha = process.alpha(t).to(x0.dtype).reshape(shape)
    sigma = process.sigma(t).to(x0.dtype).reshape(shape)
    x_t = alpha * x0 + sigma * noise
    target = from_x0_eps(prediction, x0, noise, t, process)
    out = net(x_t, t.to(x0.dtype)) if labels is None else net(x_t, t.to(x0.dtype), labels)
    return F.mse_loss(out, target)


# ---------------------------------------------------------------------------------- weight files

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_weights(name: str, net: nn.Module, metadata: dict[str, Any], directory: str | Path = WEIGHTS_DIR,
                 overwrite: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """Write NAME.safetensors (parameters cast to `dtype`) and NAME.json (metadata plus the sha256)."""
    directory = Path(directory)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in net.state_dict().items()}
    blob = save(tensors)
    record = {"format": WEIGHTS_FORMAT, "name": name, **metadata, "stored_dtype": str(dtype).replace("torch.", ""),
              "parameters": sum(p.numel() for p in net.parameters()), "bytes": len(blob), "sha256": _sha256(blob)}
    json_path, weight_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    for path in (json_path, weight_path):
        if path.exists() and not overwrite:
            raise OptimalStepsError(f"{path} already exists; pass --force to overwrite")
    write_bytes(weight_path, blob, overwrite)
    write_text(json_path, json.dumps(record, indent=2) + "\n", overwrite)
    return weight_path


def load_network(name: str, directory: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The network NAME from its weight files (float32, eval mode) and its metadata, integrity checked."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    json_path, weight_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    hint = "reinstall optimalsteps or retrain it with the scripts in training/"
    for path in (json_path, weight_path):
        if not path.is_file():
            raise OptimalStepsError(f"weight file for {name!r} is missing: {path} ({hint})")
    meta = load_json(json_path, "weight metadata")
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise OptimalStepsError(f"{json_path} is not an {WEIGHTS_FORMAT} metadata file")
    for key in ("architecture", "options", "sha256"):
        if key not in meta:
            raise OptimalStepsError(f"{json_path} is missing key {key!r}")
    blob = weight_path.read_bytes()
    if _sha256(blob) != meta["sha256"]:
        raise OptimalStepsError(f"weight file {weight_path} is corrupted (sha256 does not match {json_path.name}; {hint})")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise OptimalStepsError(f"weight file {weight_path} cannot be read: {exc}") from None
    net = build_network(meta["architecture"], dict(meta["options"]))
    try:
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OptimalStepsError(f"weight file {weight_path} does not fit its architecture: {first}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta


# ---------------------------------------------------------------------------------- model wrappers

class NetModel:
    """A trained UNet under the model contract: float32 inference without gradients, output in x's dtype."""

    def __init__(self, net: nn.Module, meta: dict[str, Any]):
        self.net = net
        self.meta = meta
        self.process = get_process(meta["process"])
        self.prediction = meta["prediction"]
        self.dataset = meta["dataset"]
        self.sample_shape = tuple(dataset_info(self.dataset).image_shape)
        self._held_out: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _run(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise OptimalStepsError(f"{self.meta['name']} takes samples of shape {list(self.sample_shape)}, "
                                    f"got {list(x.shape[1:])}")
        t = torch.as_tensor(t, device=self.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        with torch.no_grad():
            out = self.net(x.to(self.device, torch.float32), t, labels)
        return out.to(device=x.device, dtype=x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if cond:
            raise OptimalStepsError(f"{self.meta['name']} is unconditional; got condition(s) {sorted(cond)}")
        return self._run(x, t, None)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a classifier trained on the same data (for the Frechet distance in `compare`)."""
        if getattr(self, "_features", None) is None:
            self._features = feature_extractor(self.dataset)
        return self._features(images)

    def data_samples(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Held-out real images [count, C, H, W] the network never saw in training."""
        if self._held_out is None:
            self._held_out = load_dataset(self.dataset, "test").images
        return draw_images(self._held_out, count, generator)


class ConditionalNetModel(NetModel):
    """A class-conditional UNet; `labels` [B] (or one label for all) in 0..num_classes-1, or
    `num_classes` itself for the unconditional output. No labels means unconditional."""

    def __init__(self, net: nn.Module, meta: dict[str, Any]):
        super().__init__(net, meta)
        self.num_classes = int(meta["num_classes"])

    def check_labels(self, labels: Any, batch: int) -> torch.Tensor:
        """Labels as a long tensor [batch] on the network's device; a clear error for anything else."""
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise OptimalStepsError(f"class labels must be whole numbers, got dtype {labels.dtype}")
        labels = labels.reshape(-1).to(torch.long)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise OptimalStepsError(f"got {labels.numel()} class labels for {batch} samples")
        bad = labels[(labels < 0) | (labels > self.num_classes)]
        if bad.numel():
            raise OptimalStepsError(f"class label {int(bad[0])} is out of range for {self.meta['name']} "
                                    f"(classes 0..{self.num_classes - 1}, {self.num_classes} = unconditional)")
        return labels.to(self.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: Any = None, **cond: Any) -> torch.Tensor:
        if cond:
            raise OptimalStepsError(f"{self.meta['name']} takes only 'labels'; got condition(s) {sorted(cond)}")
        return self._run(x, t, None if labels is None else self.check_labels(labels, x.shape[0]))

    def with_guidance(self, scale: float) -> "GuidedNetModel":
        """This model under classifier-free guidance at `scale` (1 = plain conditional)."""
        scale = guidance_scale(scale)
        guided = GuidedNetModel(self, scale, cond_key="labels", uncond_value=self.num_classes)
        guided.spec = f"{self.meta['name']}:guidance={scale:g}"
        guided.dataset = self.dataset
        return guided


class GuidedNetModel(CFGModel):
    """CFGModel over a ConditionalNetModel that can be re-guided at another scale (the CLI's --guidance)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        # labels are checked against this batch before the guided call doubles it
        labels = cond.pop("labels", None)
        if labels is not None:
            cond["labels"] = self.model.check_labels(labels, x.shape[0])
        return super().__call__(x, t, **cond)

    def with_guidance(self, scale: float) -> "GuidedNetModel":
        return self.model.with_guidance(scale)


def guidance_scale(value: Any) -> float:
    """A classifier-free guidance scale: finite and >= 0 (0 = unconditional, 1 = plain conditional)."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise OptimalStepsError(f"guidance scale must be a number, got {value!r}") from None
    if not (math.isfinite(scale) and scale >= 0):
        raise OptimalStepsError(f"guidance scale must be finite and >= 0, got {value!r}")
    return scale


# ---------------------------------------------------------------------------------- built-in models

def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise OptimalStepsError(f"model {name!r} takes no options, got {sorted(options)}")


def load_net_model(name: str, directory: str | Path | None = None) -> NetModel:
    """The trained model NAME (e.g. digits-flow) from its weight files."""
    net, meta = load_network(name, directory)
    if meta["architecture"] != "unet":
        raise OptimalStepsError(f"{name!r} is a {meta['architecture']}, not a diffusion model")
    return ConditionalNetModel(net, meta) if meta.get("num_classes") else NetModel(net, meta)


def load_digits_flow(**options: Any) -> NetModel:
    _no_options("digits-flow", options)
    return load_net_model("digits-flow")


def load_digits_vp(**options: Any) -> NetModel:
    _no_options("digits-vp", options)
    return load_net_model("digits-vp")


def load_mnist_flow_cfg(guidance: float | str = DEFAULT_GUIDANCE, **options: Any) -> GuidedNetModel:
    if options:
        raise OptimalStepsError(f"mnist-flow-cfg takes only the option guidance, got {sorted(options)}")
    return load_net_model("mnist-flow-cfg").with_guidance(guidance_scale(guidance))


BUILTIN_MODELS: dict[str, tuple[str, Callable[..., Any]]] = {
    "digits-flow": ("UNet on 8x8 digits, flow matching, velocity prediction (trained here)", load_digits_flow),
    "digits-vp": ("UNet on 8x8 digits, VP linear beta, eps prediction (trained here)", load_digits_vp),
    "mnist-flow-cfg": ("class-conditional flow UNet on 28x28 MNIST, classifier-free guidance "
                       f"(option guidance={DEFAULT_GUIDANCE:g}; trained here)", load_mnist_flow_cfg),
}


# ---------------------------------------------------------------------------------- classifiers

def load_classifier(dataset: str, directory: str | Path | None = None) -> Classifier:
    """The digit classifier trained on `dataset`'s training split (eval mode, float32)."""
    dataset_info(dataset)
    net, meta = load_network(f"classifier-{dataset}", directory)
    if meta["architecture"] != "classifier":
        raise OptimalStepsError(f"classifier-{dataset} holds a {meta['architecture']}, not a classifier")
    return net


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, shape: tuple[int, ...],
             batch: int = 1024) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() < 2 or images[0].numel() != math.prod(shape):
        raise OptimalStepsError(f"expected images of shape [B, {', '.join(map(str, shape))}], got {list(images.shape)}")
    images = images.reshape((-1,) + shape).to(torch.float32)
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]) for i in range(0, images.shape[0], batch)]).to(torch.float64)


def feature_extractor(dataset: str, directory: str | Path | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [B, C, H, W] (or flattened) in [-1, 1] -> classifier features [B, F] float64, for Fréchet distances."""
    net = load_classifier(dataset, directory)
    shape = tuple(dataset_info(dataset).image_shape)
    return lambda images: _batched(net.features, images, shape)


def classify(dataset: str, directory: str | Path | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [B, C, H, W] (or flattened) in [-1, 1] -> class probabilities [B, num_classes] float64."""
    net = load_classifier(dataset, directory)
    shape = tuple(dataset_info(dataset).image_shape)
    return lambda images: _batched(lambda x: torch.softmax(net(x), dim=1), images, shape)
