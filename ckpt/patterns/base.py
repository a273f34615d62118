"""The tensor layout of a pattern whose tensors are cut into pieces (SHARDED, ckpt/patterns/sharded.py): how a
save takes them apart, how a load reads back only the byte ranges it needs at any layout, how export
reassembles them and how `inspect --at` describes a load. Who writes and who reads each copy of every
pattern is the placement's (ckpt/patterns/placements.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..format.manifest import ComponentEntry
from ..format.serialization import FlatState
from ..io.storage import Storage
from .kinds import SharingPattern


class TensorLayout(Protocol):
    """How a pattern whose tensors are cut into pieces (SHARDED) takes them apart on save, reads them back as
    byte ranges at any layout, reassembles them for export and describes a load for `inspect --at`."""

    pattern: SharingPattern

    def take(self, flat: FlatState, key: str) -> tuple[FlatState, Any]:
        """Save: this rank's part of a component's flattened state, and what it declares about it."""
        ...

    def read(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, stateful: Any, verify: bool,
             threads: int) -> Any:
        """Load: this rank's state of the component, for `stateful` as it is laid out now (any layout)."""
        ...

    def stage(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, stateful: Any, verify: bool,
              threads: int) -> Any:
        """The read phase of a load: as `read`, checked, but free to return a `ckpt.load.loading.DeferredRead`
        that puts the bytes into `stateful`'s live tensors only once every rank agreed to apply."""
        ...

    def full_tensors(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Export/diff: every tensor whole, under its real name."""
        ...

    def load_action(self, key: str, entry: ComponentEntry, world: int) -> tuple[str, dict[str, Any]]:
        """`ckpt inspect --at`: what a load at `world` ranks does, in words, and its details (plain data)."""
        ...


_REGISTRY: dict[SharingPattern, TensorLayout] = {}


def register(layout: TensorLayout) -> TensorLayout:
    _REGISTRY[layout.pattern] = layout
    return layout


def tensor_layout_for(pattern: SharingPattern) -> TensorLayout | None:
    """The tensor layout of `pattern`; None for the patterns saved as whole tensors."""
    return _REGISTRY.get(pattern)


__all__ = ["TensorLayout", "register", "tensor_layout_for"]
