"""ckpt: distributed checkpoint coordination for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

from .component import SharingPattern, StateComponent, ValidationLevel, rng_component
from .coordinator import CheckpointCoordinator, LoadResult
from .errors import (
    CheckpointDeletedError,
    CheckpointError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    CorruptCheckpointError,
    ManifestError,
    PartialLoadError,
    ReplicationError,
    RunDirInUseError,
    SerializationError,
)
from .format.layout import CheckpointRef, list_checkpoints
from .format.manifest import Manifest
from .format.manifest_read import read_manifest
from .io.s3 import S3Options, S3Storage
from .io.storage import LocalStorage, Storage
from .load.reshard import is_shard_entry, local_piece, needs_reshard, shard_entry
from .plain_state import RNGState
from .retention.catalog import RetentionOutcome, pin_checkpoint, unpin_checkpoint
from .retention.rules import (
    BestCheckpoint,
    CheckpointDecision,
    CheckpointInfo,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    RetentionDecision,
    RetentionPolicy,
    RetentionRule,
    infer_greater_is_better,
)
from .save.background import SaveHandle

__all__ = [
    "BestCheckpoint",
    "CheckpointCoordinator",
    "CheckpointDecision",
    "CheckpointDeletedError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CollectiveTimeoutError",
    "CorruptCheckpointError",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLatest",
    "LoadResult",
    "LocalStorage",
    "Manifest",
    "ManifestError",
    "PartialLoadError",
    "RNGState",
    "ReplicationError",
    "RetentionDecision",
    "RetentionOutcome",
    "RetentionPolicy",
    "RetentionRule",
    "RunDirInUseError",
    "S3Options",
    "S3Storage",
    "SaveHandle",
    "SerializationError",
    "SharingPattern",
    "StateComponent",
    "Storage",
    "ValidationLevel",
    "__version__",
    "infer_greater_is_better",
    "is_shard_entry",
    "list_checkpoints",
    "local_piece",
    "needs_reshard",
    "pin_checkpoint",
    "read_manifest",
    "rng_component",
    "shard_entry",
    "unpin_checkpoint",
]
