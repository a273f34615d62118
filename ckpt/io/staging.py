"""Reusable CPU copies of a component's tensors, so an async save can return while the copies are written.

Buffers are kept per (component, tensor) and reused by the next save when shape and dtype still match, so
steady-state async saves allocate nothing. Buffers for CUDA tensors are pinned, which lets the copies run
without blocking on pageable memory.
"""

from __future__ import annotations

import torch

from ..format.serialization import FlatState


class StagingPool:
    """CPU buffers that async saves copy state into. Not thread-safe: one save stages at a time."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._seen: set[tuple[str, str]] = set()

    def begin(self) -> None:
        self._seen = set()

    def stage(self, key: str, flat: FlatState) -> FlatState:
        """A copy of `flat` whose tensors live in this pool's buffers."""
        staged: dict[str, torch.Tensor] = {}
        on_cuda = False
        for name, tensor in flat.tensors.items():
            slot = (key, name)
            buf = self._buffers.get(slot)
            if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                pin = tensor.is_cuda and torch.cuda.is_available()
                buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
                self._buffers[slot] = buf
            buf.copy_(tensor, non_blocking=tensor.is_cuda)
            on_cuda |= tensor.is_cuda
            staged[name] = buf
            self._seen.add(slot)
        if on_cuda:
            torch.cuda.synchronize()
        return FlatState(tensors=staged, skeleton=flat.skeleton)

    def end(self) -> None:
        """Free the buffers of tensors this save no longer had."""
        for slot in set(self._buffers) - self._seen:
            del self._buffers[slot]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
