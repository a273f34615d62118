"""Options of the model-parallel trainers (PipelineTrainer, HybridTrainer), validated once when built."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("gpipe", "1f1b")
TP_STYLES = ("colwise", "rowwise")


class LayoutChange(str, enum.Enum):
    """What a resume does with per-rank state when the job's layout differs from the checkpoint's.

    Model, optimizer, scheduler and trainer state are always resharded (ckpt's `reshard=True`). RNG streams and
    a per-replica data position belong to ranks that no longer exist:
    ERROR refuses the resume with an error naming those components (the default: nothing changes silently);
    RESEED seeds every rank's RNG from the saved streams' digests and its new rank (deterministic, but not the
    streams an unchanged run would have drawn) and restarts the data stream at the saved global sample count.
    """

    ERROR = "error"
    RESEED = "reseed"


def _positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be an int >= 1")


@dataclass(frozen=True)
class PipelineConfig:
    """How a model is cut into pipeline stages and scheduled."""

    schedule: str = "1f1b"
    """"gpipe" (all forwards, then all backwards) or "1f1b" (one forward, one backward; less activation memory,
    needs n_microbatches >= the number of stages)."""
    n_microbatches: int = 2
    """Micro-batches each rank's batch is cut into; must divide per_device_train_batch_size."""
    split_points: tuple[str, ...] | None = None
    """Names of the top-level children that start stages 1, 2, ...; None cuts the children into equal runs."""
    on_layout_change: LayoutChange = LayoutChange.ERROR
    """What a resume with another number of stages does with RNG and data state (see LayoutChange)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig: schedule={self.schedule!r} must be one of {list(SCHEDULES)}")
        _positive("PipelineConfig", "n_microbatches", self.n_microbatches)
        if self.split_points is not None and (not isinstance(self.split_points, tuple) or not all(
                isinstance(s, str) and s for s in self.split_points)):
            raise ValueError(f"PipelineConfig: split_points={self.split_points!r} must be a tuple of child names "
                             "(e.g. ('4', '8')), or None")
        if not isinstance(self.on_layout_change, LayoutChange):
            raise ValueError(f"PipelineConfig: on_layout_change={self.on_layout_change!r} must be a "
                             "trainers.LayoutChange (ERROR or RESEED)")

    def check_stages(self, num_stages: int, batch_size: int) -> None:
        """Raise ValueError if this schedule cannot run `num_stages` stages on batches of `batch_size`."""
        if batch_size % self.n_microbatches:
            raise ValueError(f"PipelineConfig: n_microbatches={self.n_microbatches} does not divide "
                             f"per_device_train_batch_size={batch_size}; pick a divisor")
        if self.schedule == "1f1b" and self.n_microbatches < num_stages:
            raise ValueError(f"PipelineConfig: schedule='1f1b' needs n_microbatches >= the number of stages "
                             f"({num_stages}), got {self.n_microbatches}; raise it or use schedule='gpipe'")


@dataclass(frozen=True)
class ParallelConfig:
    """The device mesh of a HybridTrainer: dp x tp (tensor parallel) or dp x pp (pipeline), ranks laid out
    row-major with the last dimension varying fastest (so tp or pp ranks are neighbours, on one node)."""

    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel ranks per replica (needs tp_plan)."""
    pp: int = 1
    """Pipeline stages per replica (the model must be an nn.Sequential; see `pipeline`)."""
    tp_plan: Mapping[str, Any] | None = None
    """Module name -> "colwise" or "rowwise" (or a torch ParallelStyle), as parallelize_module takes it."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Schedule and stage cuts when pp > 1 (its on_layout_change is not used; see below)."""
    on_layout_change: LayoutChange = LayoutChange.ERROR
    """What a resume under another mesh does with RNG and data state (see LayoutChange)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            _positive("ParallelConfig", name, getattr(self, name))
        if self.tp > 1 and self.pp > 1:
            raise ValueError(f"ParallelConfig: tp={self.tp} and pp={self.pp}: a mesh with both tensor and pipeline "
                             "parallelism is not supported; use tp=1 or pp=1")
        if self.tp_plan is not None:
            if not isinstance(self.tp_plan, Mapping) or not self.tp_plan:
                raise ValueError(f"ParallelConfig: tp_plan={self.tp_plan!r} must be a non-empty mapping of module "
                                 "names to 'colwise' / 'rowwise'")
            for name, style in self.tp_plan.items():
                if isinstance(style, str) and style not in TP_STYLES:
                    raise ValueError(f"ParallelConfig: tp_plan[{name!r}]={style!r} must be one of {list(TP_STYLES)} "
                                     "or a torch ParallelStyle")
        if self.tp > 1 and self.tp_plan is None:
            raise ValueError(f"ParallelConfig: tp={self.tp} needs tp_plan (which modules to split, and how)")
        if not isinstance(self.pipeline, PipelineConfig):
            raise ValueError(f"ParallelConfig: pipeline={self.pipeline!r} must be a trainers.PipelineConfig")
        if not isinstance(self.on_layout_change, LayoutChange):
            raise ValueError(f"ParallelConfig: on_layout_change={self.on_layout_change!r} must be a "
                             "trainers.LayoutChange (ERROR or RESEED)")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def inner(self) -> str:
        """The name of the model-parallel mesh dimension ("tp" or "pp")."""
        return "pp" if self.pp > 1 else "tp"

    @property
    def inner_size(self) -> int:
        return self.pp if self.pp > 1 else self.tp
