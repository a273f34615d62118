"""The names a trainer declares its state with: how it is shared across ranks, and how hard its replicas are
checked. What each pattern means for writing and reading lives in its placement (placements.py)."""

from __future__ import annotations

import enum


class SharingPattern(str, enum.Enum):
    """How one piece of state is shared across the ranks of a job."""

    GLOBAL = "global"  # one logical copy for the job; rank 0 writes it
    PER_RANK = "per_rank"  # different on every rank; each rank writes its own
    REPLICATED = "replicated"  # identical on every rank; the ranks share the writing
    PER_GROUP = "per_group"  # identical inside a process group, different between groups
    PER_NODE = "per_node"  # identical inside a node; local rank 0 of each node writes
    SHARDED = "sharded"  # DTensors: each rank writes its own shards; plain values inside are replicated


class ValidationLevel(str, enum.Enum):
    """How hard to check, before writing, that replicas really are identical."""

    NONE = "none"
    QUICK = "quick"  # one digest of the whole component per rank
    TENSOR = "tensor"  # one digest per tensor; errors name the tensors that differ
    FULL = "full"  # exact comparison of the values (debugging; moves every byte between ranks)


__all__ = ["SharingPattern", "ValidationLevel"]
