"""SHARDED: state holding DTensors (FSDP2, tensor parallel, 2-D meshes), saved shard by shard and loaded at
any world size or mesh.

Save: each rank declares the box of the full tensor its shard of every DTensor covers (plain tensors cover
the whole tensor, and are held by every rank). Ranks holding the same box (a Replicate mesh dimension) write
it once, its bytes split across them (`ckpt/save/planning.py`). The manifest lists every tensor's full shape,
dtype and saved pieces with their byte ranges.

Load: each rank takes its targets from the live state (a DTensor's local box under today's mesh and
placements; a plain tensor, or a name the live state lacks, as the whole tensor), finds the saved pieces that
overlap them (`boxes.piece_overlaps`) and reads only those byte ranges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import xxhash

from ..errors import SerializationError
from ..format.manifest import ComponentEntry
from ..format.serialization import FlatState, flatten_state
from ..format.tensor_io import ST_TO_DTYPE, st_dtype, tensor_bytes
from ..io.storage import Storage
from ..load.loading import DeferredRead
from .base import register
from .boxes import Box, whole
from .dtensor import is_dtensor, is_shared, local_box, unsupported_placement
from .kinds import SharingPattern
from .sharded_read import RangeRead, Target, merged_spans, plan_reads, read_sharded, read_targets, targets_for

STATE_FILE = "state.msgpack"  # the skeleton of a SHARDED component, in its folder


def shard_file(rank: int) -> str:
    """The tensors file rank `rank` writes for a SHARDED component."""
    return f"shards-rank-{rank:05d}.safetensors"


@dataclass(frozen=True)
class ShardMeta:
    """What this rank holds of one tensor of a SHARDED component (sent to every rank at save time)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    box: Box
    replicated: bool  # a plain tensor: every rank holds all of it
    shared: bool = False  # a DTensor shard other ranks hold too (a Replicate() mesh dimension of size > 1)
    digest: str | None = None  # of a shared shard's bytes, compared across its holders before writing

    def to_wire(self) -> list:
        return [self.name, self.dtype, list(self.shape), list(self.box.offsets), list(self.box.lengths),
                self.replicated, self.shared, self.digest]

    @classmethod
    def from_wire(cls, w: list) -> ShardMeta:
        return cls(w[0], w[1], tuple(w[2]), Box(tuple(w[3]), tuple(w[4])), bool(w[5]), bool(w[6]), w[7])


def refuse_dtensors(flat: FlatState, key: str, pattern_name: str) -> None:
    """A DTensor in a component of another pattern cannot be saved: say where, and point at SHARDED."""
    for name, t in flat.tensors.items():
        if is_dtensor(t):
            raise SerializationError(
                f"component {key!r}, key {name!r} is a DTensor (sharded over a DeviceMesh), but the component is "
                f"{pattern_name}; declare it with SharingPattern.SHARDED so each rank saves its own shards (and a "
                "load at any mesh reads back only what it needs)", component=key, key_path=name)


def take_shards(flat: FlatState, key: str) -> tuple[FlatState, dict[str, ShardMeta]]:
    """This rank's local shards in place of the DTensors of `flat`, and what each tensor holds."""
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, ShardMeta] = {}
    for name, t in flat.tensors.items():
        if is_dtensor(t):
            why = unsupported_placement(t)
            if why is not None:
                raise SerializationError(f"component {key!r}, key {name!r} {why}", component=key, key_path=name)
            local = t.to_local().detach()
            metas[name] = ShardMeta(name, st_dtype(local, name), tuple(t.shape), local_box(t), False,
                                    is_shared(t))
        else:
            local = t
            metas[name] = ShardMeta(name, st_dtype(t, name), tuple(t.shape), whole(t.shape), True)
        tensors[name] = local
    return FlatState(tensors, flat.skeleton), metas


def with_digests(flat: FlatState, metas: Mapping[str, ShardMeta]) -> dict[str, ShardMeta]:
    """`metas` with a digest of every shared shard, so its holders can be compared before anything is written."""
    return {n: replace(m, digest=xxhash.xxh3_128_hexdigest(tensor_bytes(flat.tensors[n]))) if m.shared else m
            for n, m in metas.items()}


def replicated_view(flat: FlatState, metas: Mapping[str, ShardMeta]) -> FlatState:
    """The part of a SHARDED component every rank holds the same (plain tensors and values): what the
    replica check compares."""
    return FlatState({n: t for n, t in flat.tensors.items() if metas[n].replicated}, flat.skeleton)


# ---- load (the reads themselves: ckpt/patterns/sharded_read.py) ----------------------------------

def live_tensors(stateful: Any, key: str) -> dict[str, Any]:
    """The component's current tensors by name (DTensors as they are), the targets of a load; none for no live
    object (an offline export), so every tensor is read whole."""
    if stateful is None:
        return {}
    return flatten_state(stateful.state_dict(), key).tensors


def full_tensors(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, threads: int = 1
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a SHARDED component reassembled whole, by name, one at a time (so memory holds one)."""
    for name, t in sorted((entry.tensors or {}).items()):
        yield name, read_targets(storage, ckpt_dir, key, entry, {name: Target(whole(t.shape))}, threads)[name]


def _fsdp_box(shape: tuple[int, ...], rank: int, world: int) -> Box:
    """Rank `rank`'s box of a tensor of `shape` under Shard(0) over `world` ranks (torch.chunk's split, as
    FSDP2 uses)."""
    if not shape:
        return whole(shape)
    per = -(-shape[0] // world)
    lo = min(rank * per, shape[0])
    return Box((lo,) + (0,) * (len(shape) - 1), (min(per, shape[0] - lo), *shape[1:]))


def reads_at_world(key: str, entry: ComponentEntry, world: int) -> list[dict[str, Any]]:
    """What each rank of a job of `world` ranks would read of a SHARDED component, assuming the common layout:
    FSDP2, which shards every tensor with a dimension along dimension 0 (scalars stay whole). The manifest does
    not say which tensors the loading job will shard (its live state does), so this is an estimate for them.
    Per rank: the byte ranges by file, the bytes read, and the bytes of its target shards."""
    saved = entry.tensors or {}
    out = []
    for rank in range(world):
        targets = {}
        for name, t in saved.items():
            targets[name] = Target(_fsdp_box(t.shape, rank, world))
        ranges = merged_spans(plan_reads(key, saved, targets))
        need = sum(t.box.numel * ST_TO_DTYPE[saved[n].dtype].itemsize for n, t in targets.items())
        out.append({"rank": rank, "ranges": ranges, "read_bytes": sum(e - b for v in ranges.values() for b, e in v),
                    "target_bytes": need})
    return out


class Sharded:
    """The SHARDED placement: each rank writes its own shards (shared ones once, split across their holders;
    planned in ckpt/save/planning.py `plan_sharded`, which owns the cutting primitives), each rank reads only
    the byte ranges overlapping its own shards at any layout, export reassembles whole tensors."""

    pattern = SharingPattern.SHARDED

    def take(self, flat: FlatState, key: str) -> tuple[FlatState, dict[str, ShardMeta]]:
        return take_shards(flat, key)

    def read(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, stateful: Any, verify: bool,
             threads: int) -> Any:
        staged = self.stage(storage, ckpt_dir, key, entry, stateful, verify, threads)
        return staged.read(None) if isinstance(staged, DeferredRead) else staged

    def stage(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, stateful: Any, verify: bool,
              threads: int) -> Any:
        return read_sharded(storage, ckpt_dir, key, entry, live_tensors(stateful, key), verify, threads)

    def full_tensors(self, storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        return full_tensors(storage, ckpt_dir, key, entry)

    def load_action(self, key: str, entry: ComponentEntry, world: int) -> tuple[str, dict[str, Any]]:
        return (("each rank reads only the saved byte ranges that overlap its own shards (no flags; the ranges "
                 "listed assume FSDP2: Shard(0) over the new world for every tensor with a dimension)"),
                {"reads": reads_at_world(key, entry, world)})


SHARDED = register(Sharded())


__all__ = [
    "SHARDED",
    "STATE_FILE",
    "RangeRead",
    "ShardMeta",
    "Sharded",
    "Target",
    "full_tensors",
    "live_tensors",
    "plan_reads",
    "read_sharded",
    "read_targets",
    "reads_at_world",
    "refuse_dtensors",
    "replicated_view",
    "shard_file",
    "take_shards",
    "targets_for",
    "with_digests",
]
