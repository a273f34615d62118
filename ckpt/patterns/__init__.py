"""One placement class per sharing pattern: who writes, who reads, how the state reshards and how the `ckpt`
command shows it, in one home per pattern (`placement_for`). Patterns whose tensors are taken apart into
pieces on save (SHARDED) also have a tensor layout (`tensor_layout_for`): how the pieces are cut, recorded
and read back as byte ranges."""

from __future__ import annotations

from . import sharded  # registers the SHARDED tensor layout
from .base import TensorLayout, tensor_layout_for
from .placements import Placement, placement_for

__all__ = ["Placement", "TensorLayout", "placement_for", "sharded", "tensor_layout_for"]
