"""ckpt: distributed checkpoint coordination for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

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

__all__ = [
    "CheckpointCoordinator",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CollectiveTimeoutError",
    "CorruptCheckpointError",
    "LoadResult",
    "Manifest",
    "ManifestError",
    "ReplicationError",
    "SerializationError",
    "SharingPattern",
    "StateComponent",
    "ValidationLevel",
    "__version__",
    "list_checkpoints",
    "read_manifest",
]
