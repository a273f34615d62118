"""The contract of a placement: one class per sharing pattern saying who writes, who reads, how the state
reshards and how the `ckpt` command shows it, so those rules have one home instead of a branch per pattern in
each stage. SHARDED is the first pattern with a class (ckpt/patterns/sharded.py); the others still live in the
stages' own branches (planning, read phase, reshard, export, inspection) and move here one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..component import SharingPattern
from ..format.manifest import ComponentEntry
from ..format.serialization import FlatState
from ..io.storage import Storage


class Placement(Protocol):
    """How one sharing pattern is saved, loaded, resharded and shown."""

    pattern: SharingPattern

    def take(self, flat: FlatState, key: str) -> tuple[FlatState, Any]:
        """Save: this rank's part of a component's flattened state, and what it declares about it."""
        ...

    def read(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, stateful: Any, verify: bool,
             threads: int) -> Any:
        """Load: this rank's state of the component, for `stateful` as it is laid out now (any layout)."""
        ...

    def full_tensors(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Export/diff: every tensor whole, under its real name."""
        ...

    def load_action(self, key: str, entry: ComponentEntry, world: int) -> tuple[str, dict[str, Any]]:
        """`ckpt inspect --at`: what a load at `world` ranks does, in words, and its details (plain data)."""
        ...


_REGISTRY: dict[SharingPattern, Placement] = {}


def register(placement: Placement) -> Placement:
    _REGISTRY[placement.pattern] = placement
    return placement


def placement_for(pattern: SharingPattern) -> Placement | None:
    """The placement class of `pattern`, or None while the pattern's rules still live in the stages."""
    return _REGISTRY.get(pattern)


__all__ = ["Placement", "placement_for", "register"]
