"""Centralised batch dispatch: rank 0 draws each global batch and scatters one slice to every rank.

Each step rank 0 broadcasts a small msgpack header (the batch's structure, every tensor's dtype and
shape, and its loader's state), then scatters each tensor along its first dimension. Every rank keeps
rank 0's loader state, so the data state is one global value (saved GLOBAL) on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from .data import StatefulDataLoader


def _flatten(obj: Any, leaves: list[torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return "t"
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"dispatch_batches=True: batch{path} has non-string keys {bad[:3]}")
        return ["d", [[k, _flatten(v, leaves, f"{path}[{k!r}]")] for k, v in obj.items()]]
    if isinstance(obj, list | tuple):
        return ["l" if isinstance(obj, list) else "u", [_flatten(v, leaves, f"{path}[{i}]") for i, v in enumerate(obj)]]
    raise TypeError(f"dispatch_batches=True scatters tensors, but batch{path} is a {type(obj).__name__}; collate "
                    "batches into tensors (in dicts, lists or tuples), or use dispatch_batches=False")


def _build(spec: Any, leaves: list[torch.Tensor]) -> Any:
    if spec == "t":
        return leaves.pop(0)
    kind, items = spec
    if kind == "d":
        return {k: _build(v, leaves) for k, v in items}
    built = [_build(v, leaves) for v in items]
    return built if kind == "l" else tuple(built)


def _broadcast_bytes(data: bytes | None, group: Any, rank: int) -> bytes:
    size = torch.tensor([len(data) if rank == 0 and data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if rank == 0 and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0, group=group)
    return bytes(buf.numpy())


class DispatchingLoader:
    """Endless batches: rank 0 draws from `loader`, every rank gets its slice. Stateful (rank 0's state)."""

    def __init__(self, loader: StatefulDataLoader, group: Any, rank: int, world_size: int):
        self.loader = loader  # every rank holds one so it can keep rank 0's state; only rank 0 draws
        self.group, self.rank, self.world_size = group, rank, world_size

    def __iter__(self) -> DispatchingLoader:
        return self

    def __next__(self) -> Any:
        header: bytes | None = None
        leaves: list[torch.Tensor] = []
        error: Exception | None = None
        if self.rank == 0:
            try:
                header = self._draw(leaves)
            except Exception as exc:  # tell the other ranks instead of leaving them in the broadcast
                error = exc
                header = msgpack.packb({"error": f"{type(exc).__name__}: {exc}"}, use_bin_type=True)
        meta = msgpack.unpackb(_broadcast_bytes(header, self.group, self.rank), raw=False)
        if "error" in meta:
            raise RuntimeError(f"rank 0 could not draw the next global batch: {meta['error']}") from error
        if self.rank != 0:
            self.loader.load_state_dict(meta["state"])
        mine = []
        for i, (dtype, shape) in enumerate(meta["leaves"]):
            out = torch.empty([shape[0] // self.world_size, *shape[1:]], dtype=getattr(torch, dtype))
            chunks = list(leaves[i].contiguous().chunk(self.world_size)) if self.rank == 0 else None
            dist.scatter(out, chunks, src=0, group=self.group)
            mine.append(out)
        return _build(meta["spec"], mine)

    def _draw(self, leaves: list[torch.Tensor]) -> bytes:
        spec = _flatten(next(self.loader), leaves, "")
        for i, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] % self.world_size:
                raise ValueError(f"dispatch_batches=True: tensor {i} of the batch has shape {list(t.shape)}; its "
                                 f"first dimension must split evenly over {self.world_size} ranks")
        described = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in leaves]
        return msgpack.packb({"spec": spec, "leaves": described, "state": self.loader.state_dict()},
                             use_bin_type=True)

    @property
    def progress(self) -> float:
        return self.loader.progress

    def state_dict(self) -> dict[str, Any]:
        return {"dispatch_batches": True, **self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("dispatch_batches"):
            raise ValueError("the checkpoint's data state was written with dispatch_batches=False (one sampler per "
                             "rank); this run has dispatch_batches=True. Resume with the same setting")
        self.loader.load_state_dict({k: v for k, v in state.items() if k != "dispatch_batches"})
