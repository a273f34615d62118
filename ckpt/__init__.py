"""ckpt: distributed checkpoint coordination for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import RetentionOutcome, pin_checkpoint, unpin_checkpoint
from .component import SharingPattern, StateComponent, ValidationLevel
from .coordinator import CheckpointCoordinator, LoadResult
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    CorruptCheckpointError,
    ManifestError,
    ReplicationError,
    SerializationError,
)
from .layout import CheckpointRef, list_checkpoints
from .manifest import Manifest, read_manifest
from .retention import BestCheckpoint, CheckpointDecision, CheckpointInfo, RetentionDecision, RetentionPolicy

__all__ = [
    "BestCheckpoint",
    "CheckpointCoordinator",
    "CheckpointDecision",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CollectiveTimeoutError",
    "CorruptCheckpointError",
    "LoadResult",
    "Manifest",
    "ManifestError",
    "ReplicationError",
    "RetentionDecision",
    "RetentionOutcome",
    "RetentionPolicy",
    "SerializationError",
    "SharingPattern",
    "StateComponent",
    "ValidationLevel",
    "__version__",
    "list_checkpoints",
    "pin_checkpoint",
    "read_manifest",
    "unpin_checkpoint",
]
