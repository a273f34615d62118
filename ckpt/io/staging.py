"""Reusable host copies of a component's tensors: what a save writes while training goes on.

Buffers are kept per (component, tensor) and reused by the next save when shape and dtype still match, so
steady-state saves allocate nothing. An async save stages every tensor; a sync save stages only device
(CUDA) tensors, which must come to the host anyway, once, instead of once for the digest and once more for
the write.

Device tensors are copied into pinned buffers on a side stream. `stage` does not wait for those copies: the
caller's stream is made to wait for them instead (so the training step that follows cannot change a tensor
before its copy is taken), and the writer calls `settle()` before it reads a buffer. An async save of GPU
state therefore blocks the training thread only for queueing the copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..format.serialization import FlatState


class StagingPool:
    """Host buffers that saves copy state into. Not thread-safe: one save stages at a time."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._seen: set[tuple[str, str]] = set()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per device, reused
        self._queued: set[torch.device] = set()  # devices with copies queued by this save
        self._copies: list[torch.cuda.Event] = []

    def begin(self) -> None:
        self.settle()
        self._seen = set()

    def stage(self, key: str, flat: FlatState, *, host_too: bool = True) -> FlatState:
        """A copy of `flat` whose tensors live in this pool's buffers (`host_too=False`: device tensors only;
        host tensors are then passed through as they are)."""
        staged: dict[str, torch.Tensor] = {}
        for name, tensor in flat.tensors.items():
            slot = (key, name)
            if not (host_too or tensor.is_cuda):
                staged[name] = tensor
                if slot in self._buffers:  # kept for the next async save: a sync save in between frees nothing
                    self._seen.add(slot)
                continue
            buf = self._buffer(slot, tensor)
            if tensor.is_cuda:
                self._copy_from_device(buf, tensor)
            else:
                buf.copy_(tensor)
            staged[name] = buf
            self._seen.add(slot)
        return FlatState(tensors=staged, skeleton=flat.skeleton)

    def _buffer(self, slot: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            # Pinned, so the device copy is a DMA that runs beside the training stream.
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self._buffers[slot] = buf
        return buf

    def _copy_from_device(self, buf: torch.Tensor, tensor: torch.Tensor) -> None:
        side = self._streams.get(tensor.device)
        if side is None:
            side = self._streams[tensor.device] = torch.cuda.Stream(device=tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the values queued work produces, not older
        with torch.cuda.stream(side):
            buf.copy_(tensor, non_blocking=True)
        # The caching allocator must not hand this memory to someone else before the side stream has read it.
        tensor.record_stream(side)
        self._queued.add(tensor.device)

    def end(self) -> None:
        """Free the buffers of tensors this save no longer had, and order the caller's later work after the
        device copies: a step queued after the save cannot change a tensor before it is copied."""
        for slot in set(self._buffers) - self._seen:
            del self._buffers[slot]
        for device in self._queued:
            done = torch.cuda.Event()
            done.record(self._streams[device])
            torch.cuda.current_stream(device).wait_event(done)
            self._copies.append(done)
        self._queued = set()

    def settle(self) -> None:
        """Block until every device copy queued by `stage` has landed in its buffer (the writer calls this)."""
        copies, self._copies = self._copies, []
        for done in copies:
            done.synchronize()

    def detach(self, key: str, names: Iterable[str]) -> None:
        """Hand the buffers of these tensors of component `key` to the caller, who keeps them (read-only) as a
        host copy of the state: the next save stages into other buffers."""
        for name in names:
            self._buffers.pop((key, name), None)

    def adopt(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take detached buffers back for reuse once their owner is done with them (no one may read them after
        this: the next save writes into them). A slot that has a buffer again keeps it."""
        for name, tensor in tensors.items():
            self._buffers.setdefault((key, name), tensor)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
