"""The search's options, as small dataclasses: what the DP optimises (`DPOptions`, with its `CostView`),
where and in what precision its tensors live (`Storage`), and whether it writes checkpoints
(`Checkpointing`). Each has `from_args(args)` for the CLI's flags; `from_flat(options)` turns the flat
keyword options of `make_schedule("oss", ...)` / `compare(options={"oss": ...})` into them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..core.checks import check_optional_int, check_storage_dtype
from ..core.errors import OptimalStepsError, unknown
from .coarse import CoarseToFine
from .dp import AGGREGATES, COSTS
from .memory import check_storage, storage_dtype
from .objectives import check_objective


@dataclass(frozen=True)
class CostView:
    """The part of a sample the DP's cost sees, and the precision it is computed in: `channels` (dim 0 of a
    sample) and `frames` (dim 1 of a 4-d [C, F, H, W] sample), as the authors' video search does."""

    channels: Optional[Sequence[int]] = None
    frames: Optional[Sequence[int]] = None
    dtype: torch.dtype = torch.float64

    @property
    def whole(self) -> bool:
        return self.channels is None and self.frames is None


@dataclass(frozen=True)
class DPOptions:
    """What the DP optimises and how (docs/search.md).

    - `cost`: "xt" (mean squared distance to the teacher state, the released code's) or "x0" (distance of the
      model's clean estimate at the candidate state to the teacher's there; the `candidates` best sources of
      each cell by xt cost are re-ranked, at one model call each; Heun's corrector likewise).
    - `aggregate`: "joint" (one DP, cost averaged over samples; the default) or "median" (a DP per sample,
      then the per-position median of teacher indices: the paper's OSS-ave; with an `objective`, the best
      by it on the search samples of the median and the per-sample paths, docs/search.md).
    - `free_start`: the first step may start from the initial state placed at any later grid point.
    - `reference_compat`: the authors' released semantics (per-sample "at most k steps" cells, median,
      xt cost, euler); settings it cannot honour (cost x0, aggregate joint, free_start, coarse_to_fine) are
      refused rather than silently changed.
    - `coarse_to_fine` (True or a `CoarseToFine`): the DP on a coarse sub-grid, then on bands around its
      choices (far fewer model calls, docs/refine.md).
    - `through` (step k, grid index j): the schedule's k-th time must be teacher grid point j, a time every
      schedule has to hit (Wan 2.2's expert boundary); plain DP only.
    """

    cost: str = "xt"
    aggregate: Optional[str] = None  # None: "joint" (the reference DP: its per-sample median)
    candidates: int = 4
    free_start: bool = False
    reference_compat: bool = False
    coarse_to_fine: CoarseToFine | bool = False
    view: CostView = field(default_factory=CostView)
    objective: Optional[str] = None  # None: "log" validated, "mse" plain DP, the paper's median for "median"
    width: Optional[int] = None  # histories kept per cell; None: 4 validated, 1 plain DP
    through: Optional[tuple[int, int]] = None  # (step k, teacher grid index j) the schedule must pass

    def __post_init__(self):
        if self.cost not in COSTS:
            raise unknown("cost", self.cost, COSTS)
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise unknown("aggregate", self.aggregate, AGGREGATES)
        if isinstance(self.candidates, bool) or int(self.candidates) != self.candidates or self.candidates < 1:
            raise OptimalStepsError(f"candidates must be at least 1, got {self.candidates}")
        if self.objective is not None:
            check_objective(self.objective)
        if self.width is not None and (isinstance(self.width, bool) or int(self.width) != self.width
                                       or self.width < 1):
            raise OptimalStepsError(f"width must be a whole number >= 1, got {self.width}")
        if self.through is not None and (len(self.through) != 2 or not all(
                not isinstance(v, bool) and int(v) == v and v >= 1 for v in self.through)):
            raise OptimalStepsError(f"through must be (step, grid index), both >= 1, got {self.through!r}")
        if self.through is not None and (self.reference_compat or self.coarse_to_fine):
            raise OptimalStepsError("through is for the exact plain DP, not with reference_compat or coarse to fine")
        if self.reference_compat:
            refused = [text for text, given in (("cost x0", self.cost == "x0"),
                                                ("aggregate joint", self.aggregate == "joint"),
                                                ("free start", self.free_start),
                                                ("coarse to fine", bool(self.coarse_to_fine))) if given]
            if refused:
                raise OptimalStepsError(f"--reference-compat runs the released code's DP (xt cost, per-sample "
                                        f"median, exact start), which cannot honour: {', '.join(refused)}")

    @property
    def per_sample(self) -> bool:
        """Whether the DP runs per sample (median aggregation, or the reference DP)."""
        return self.reference_compat or self.aggregate == "median"

    @property
    def aggregate_run(self) -> str:
        """The aggregation that actually runs."""
        return "median" if self.per_sample else "joint"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DPOptions":
        fast = CoarseToFine(args.coarse_steps) if getattr(args, "coarse_to_fine", False) else False
        return cls(cost=args.cost, aggregate=args.aggregate, free_start=args.free_start,
                   reference_compat=args.reference_compat, coarse_to_fine=fast,
                   objective=getattr(args, "objective", None), width=getattr(args, "beam_width", None))


@dataclass(frozen=True)
class Storage:
    """Where and in what precision the search's large tensors live, and the bounds on their size
    (docs/scale.md).

    - `place`: "memory" (the compute device), "cpu" (host memory) or "disk" (memory-mapped files in `dir`);
    - `dtype`: the teacher trajectory's precision (None: the state's; costs are float32 or better);
    - `target_chunk`: targets per cost block (bounds per-layer temporaries);
    - `memory_limit`: refuse a search estimated to need more bytes (None: what is free);
    - `max_batch`: the largest batch of one model call;
    - `distributed`: under torch.distributed, each rank searches its share of the noise (False: all of it);
    - `estimate`: a peak-memory estimate already made for these options (`search.memory_estimate`; the CLI
      prints it first), so the search does not make it again; None: the search makes it.
    """

    place: str = "memory"
    dtype: torch.dtype | str | None = None
    dir: Optional[str] = None
    target_chunk: Optional[int] = None
    memory_limit: Optional[int] = None
    max_batch: int = 4096
    distributed: bool = True
    estimate: Optional[dict[str, int]] = None

    def __post_init__(self):
        check_storage(self.place)
        object.__setattr__(self, "dtype", check_storage_dtype(storage_dtype(self.dtype)))
        check_optional_int(self.memory_limit, "memory_limit (bytes)")
        for what, value in (("target_chunk", self.target_chunk), ("max_batch", self.max_batch)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise OptimalStepsError(f"{what} must be a whole number >= 1, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Storage":
        return cls(place=args.storage, dtype=args.storage_dtype, dir=args.storage_dir,
                   target_chunk=args.target_chunk, memory_limit=args.memory_limit, max_batch=args.max_batch)


@dataclass(frozen=True)
class Checkpointing:
    """Checkpoints after the teacher and after each DP layer in `dir`; `resume` continues from them."""

    dir: Optional[str] = None
    resume: bool = False

    def __post_init__(self):
        if self.resume and self.dir is None:
            raise OptimalStepsError("--resume needs the --checkpoint directory of the search to continue")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Checkpointing":
        return cls(dir=args.checkpoint, resume=args.resume)


# flat keyword name -> (option object, its field), for make_schedule("oss", ...) and compare's options
FLAT_OPTIONS = {
    "cost": ("dp", "cost"), "aggregate": ("dp", "aggregate"), "candidates": ("dp", "candidates"),
    "free_start": ("dp", "free_start"), "reference_compat": ("dp", "reference_compat"),
    "coarse_to_fine": ("dp", "coarse_to_fine"), "objective": ("dp", "objective"), "width": ("dp", "width"),
    "through": ("dp", "through"),
    "cost_channels": ("view", "channels"), "cost_frames": ("view", "frames"), "cost_dtype": ("view", "dtype"),
    "storage": ("storage", "place"), "storage_dtype": ("storage", "dtype"), "storage_dir": ("storage", "dir"),
    "target_chunk": ("storage", "target_chunk"), "memory_limit": ("storage", "memory_limit"),
    "max_batch": ("storage", "max_batch"), "distributed": ("storage", "distributed"),
    "checkpoint_dir": ("checkpointing", "dir"), "resume": ("checkpointing", "resume"),
}


def from_flat(options: dict[str, Any]) -> dict[str, Any]:
    """Keyword options with the flat names of FLAT_OPTIONS gathered into `dp`, `storage` and `checkpointing`
    objects (other options pass through). A flat name given beside its object is refused."""
    groups: dict[str, dict[str, Any]] = {"dp": {}, "view": {}, "storage": {}, "checkpointing": {}}
    rest = {}
    for key, value in options.items():
        # `storage` is both the flat name of Storage.place and the Storage object's own keyword
        if key in FLAT_OPTIONS and not isinstance(value, (DPOptions, Storage, Checkpointing)):
            group, name = FLAT_OPTIONS[key]
            groups[group][name] = value
        else:
            rest[key] = value
    if groups["view"]:
        groups["dp"]["view"] = CostView(**groups.pop("view"))
    for group in ("dp", "storage", "checkpointing"):
        if groups[group] and group in rest:
            raise OptimalStepsError(f"give {group}= or its flat options ({', '.join(groups[group])}), not both")
    kinds = {"dp": DPOptions, "storage": Storage, "checkpointing": Checkpointing}
    for group, values in groups.items():
        if group in kinds and values:
            rest[group] = kinds[group](**values)
    return rest
