"""What ckpt needs to know about a DTensor: where its local shard sits, and how to rebuild one around a
local tensor with today's mesh and placements. The uses of torch's private names (the strided placement FSDP2
gives tensor-parallel shards, and the function that places it) are here."""

from __future__ import annotations

import math
from typing import Any

import torch

from .boxes import Box, row_major_strides

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # torch built without distributed support: there are no DTensors to meet
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = _StridedShard = None  # type: ignore[assignment,misc]


def is_dtensor(value: Any) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def strided_nests(placements: Any, mesh_shape: tuple[int, ...], ndim: int) -> bool:
    """Whether every _StridedShard(d, split_factor=s) in `placements` is split by the later mesh dimensions into
    exactly s pieces of dimension d (plain Shard(d)): then the later dimensions cut d first and the strided one
    cuts within their piece, so a rank holds one box. FSDP2 over a tensor-parallel model places parameters so
    (_StridedShard on "dp", Shard on "tp"); other strided layouts hold several boxes per rank."""
    for i, p in enumerate(placements):
        if type(p) is not _StridedShard:
            continue
        later = [q for q in placements[i + 1:] if type(q) in (Shard, _StridedShard) and q.dim % ndim == p.dim % ndim]
        if any(type(q) is not Shard for q in later):
            return False
        pieces = math.prod(mesh_shape[j] for j in range(i + 1, len(placements))
                           if type(placements[j]) is Shard and placements[j].dim % ndim == p.dim % ndim)
        if pieces != p.split_factor:
            return False
    return True


def unsupported_placement(t: Any) -> str | None:
    """Why the DTensor's local shard is not one box of the full tensor (Partial sums, strided shards that do not
    nest), or None when it is."""
    for p in t.placements:
        if type(p) is _StridedShard and strided_nests(t.placements, tuple(t.device_mesh.shape), t.dim()):
            continue
        if type(p) is not Replicate and type(p) is not Shard:
            return (f"has placement {p!r}; ckpt saves Shard(dim) and Replicate() placements, and FSDP2's strided "
                    "shards over tensor-parallel ones (redistribute it, e.g. t.redistribute(placements=[...]), or "
                    "call full_tensor() before saving)")
    return None


def local_box(t: Any) -> Box:
    """The box of the full tensor that this rank's shard of DTensor `t` holds."""
    if all(type(p) is Replicate or type(p) is Shard for p in t.placements):
        coordinate = t.device_mesh.get_coordinate()
        if coordinate is not None:
            return shard_box(tuple(t.shape), tuple(t.device_mesh.shape), tuple(coordinate), t.placements)
    # Other placements (strided shards): torch's own function, which DCP's planner uses too. It is slow (it
    # builds index tensors as long as the sharded dimension), so plain Shard/Replicate never come here. It gives
    # one box, which is what a rank holds only when the strided shards nest (Partial sums are no box at all).
    why = unsupported_placement(t)
    if why is not None:
        raise ValueError(f"a DTensor of shape {list(t.shape)} {why}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    box = Box(tuple(int(o) for o in offsets), tuple(int(n) for n in shape))
    if t.device_mesh.get_coordinate() is not None and tuple(t.to_local().shape) != box.lengths:
        raise ValueError(f"a DTensor of shape {list(t.shape)} placed {t.placements} holds a local shard of "
                         f"{list(t.to_local().shape)}, not the box {list(box.lengths)} at {list(box.offsets)}; its "
                         "placements do not give one box per rank (redistribute it to Shard/Replicate placements)")
    return box


def shard_box(global_shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
              placements: Any) -> Box:
    """The box a rank at `coordinate` of a mesh holds of a tensor placed by Shard(d)/Replicate() placements.
    Shards split a dimension as torch.chunk does (pieces of ceil(n / k), the last ones shorter or empty), mesh
    dimensions from left to right, each splitting what the previous ones left this rank."""
    lengths, offsets = list(global_shape), [0] * len(global_shape)
    for mesh_dim, p in enumerate(placements):
        if type(p) is not Shard:
            continue
        d, parts, index = p.dim % len(global_shape), mesh_shape[mesh_dim], coordinate[mesh_dim]
        size = lengths[d]
        chunk = -(-size // parts)
        start = chunk * index
        if start >= size:  # an empty shard sits at the end of the full dimension, as torch places it
            lengths[d], offsets[d] = 0, global_shape[d]
            continue
        lengths[d] = min(size, start + chunk) - start
        offsets[d] += start
    return Box(tuple(offsets), tuple(lengths))


def is_shared(t: Any) -> bool:
    """Whether other ranks hold the same shard of `t` (a Replicate() placement over a mesh dimension > 1)."""
    return any(type(p) is Replicate and t.device_mesh.size(d) > 1 for d, p in enumerate(t.placements))


def holds_shard(t: Any) -> bool:
    """Whether this rank is part of the DTensor's mesh (ranks outside it hold nothing)."""
    return t.device_mesh.get_coordinate() is not None


def like(local: torch.Tensor, target: Any) -> Any:
    """A DTensor with `target`'s mesh, placements and global shape around `local` (this rank's shard)."""
    shape = tuple(target.shape)
    return DTensor.from_local(local.to(target.device), target.device_mesh, target.placements, run_check=False,
                              shape=torch.Size(shape), stride=row_major_strides(shape))


__all__ = ["holds_shard", "is_dtensor", "is_shared", "like", "local_box", "shard_box", "strided_nests",
           "unsupported_placement"]
