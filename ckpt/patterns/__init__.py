"""One placement class per sharing pattern: who writes, who reads, how the state reshards and how the `ckpt`
command shows it, in one home per pattern."""

from __future__ import annotations

from . import sharded  # registers the SHARDED placement
from .base import Placement, placement_for

__all__ = ["Placement", "placement_for", "sharded"]
