"""Loading state saved under another layout: assemble a component from every saved copy.

A PER_RANK, PER_GROUP or PER_NODE component is saved as one copy per rank, group or node. When the job
that loads it is laid out differently (another world size, other groups, another node count), this rank
has no copy of its own. With `CheckpointCoordinator.load(..., reshard=True)` such a component is instead
read from *every* saved copy and the copies are merged into one state dict:

- dicts are merged key by key, so copies that hold different names (pipeline stages keyed by their
  parameters' fully qualified names) add up to the whole model;
- a *shard entry* (`shard_entry()`: a piece of a larger tensor with its offsets, e.g. a DTensor's local
  shard) found at the same key in several copies is assembled into the full tensor, after checking that
  the pieces cover it exactly (pieces saved twice, as Replicate placements are, must be identical);
- any other value found in several copies must be identical in all of them; state that really differs
  per copy (RNG streams, a per-rank sampler) cannot be merged and raises an error naming the component,
  the key and the copies.

The component's `load_state_dict()` then gets the merged state and takes what it needs: a stage picks its
own parameters by name, a tensor-parallel rank cuts its shard out of a full tensor with `local_piece()`.
Every rank reads every copy of such a component, so a resharded load costs the full state's memory on
each rank: it is for changing the layout once, not the fast path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..component import SharingPattern
from ..errors import CheckpointError
from ..format.manifest import ComponentEntry, Topology
from ..io.storage import Storage
from ..patterns.placements import placement_for
from ..topology import RankTopology
from .loading import read_component

SHARD_MARK = "__ckpt_shard__"  # the key that makes a dict a shard entry; its value is the entry's version
_SHARD_VERSION = 1
_SHARD_KEYS = frozenset({SHARD_MARK, "local", "offsets", "global_shape"})


def shard_entry(local: torch.Tensor, offsets: Sequence[int], global_shape: Sequence[int]) -> dict[str, Any]:
    """A piece of a larger tensor, as plain state: `local` sits at `offsets` inside a tensor of
    `global_shape`. Put it in a state dict where the tensor would go; a resharded load assembles the
    pieces of every saved copy into the full tensor (see `local_piece()` for the way back)."""
    entry = {SHARD_MARK: _SHARD_VERSION, "local": local, "offsets": [int(o) for o in offsets],
             "global_shape": [int(s) for s in global_shape]}
    check_shard_entry(entry, "shard_entry()")
    return entry


def is_shard_entry(value: Any) -> bool:
    """Whether `value` is a dict made by `shard_entry()` (or read back from one)."""
    return isinstance(value, Mapping) and SHARD_MARK in value


def check_shard_entry(entry: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming `where` unless `entry` is a well-formed shard entry."""
    if set(entry) != _SHARD_KEYS or entry[SHARD_MARK] != _SHARD_VERSION:
        raise ValueError(f"{where}: a shard entry has the keys {sorted(_SHARD_KEYS)} and version {_SHARD_VERSION}; "
                         f"got keys {sorted(map(str, entry))}, version {entry.get(SHARD_MARK)!r}")
    local, offsets, shape = entry["local"], entry["offsets"], entry["global_shape"]
    if not isinstance(local, torch.Tensor):
        raise ValueError(f"{where}: a shard entry's 'local' must be a tensor, not {type(local).__name__}")
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*offsets, *shape])
    if not (isinstance(offsets, list | tuple) and isinstance(shape, list | tuple) and ints):
        raise ValueError(f"{where}: a shard entry's offsets and global_shape must be lists of ints >= 0")
    if not len(offsets) == len(shape) == local.dim():
        raise ValueError(f"{where}: shard of shape {list(local.shape)} has offsets {list(offsets)} and global shape "
                         f"{list(shape)}; all three need the same number of dimensions")
    if any(o + n > s for o, n, s in zip(offsets, local.shape, shape, strict=True)):
        raise ValueError(f"{where}: shard of shape {list(local.shape)} at offsets {list(offsets)} runs past the "
                         f"global shape {list(shape)}")


def local_piece(entry: Mapping[str, Any], offsets: Sequence[int], shape: Sequence[int], where: str = "") -> torch.Tensor:
    """The box [offsets, offsets + shape) of the full tensor, cut out of a shard entry that covers it:
    the entry's own piece (same layout), or the full tensor a resharded load assembled."""
    label = where or "local_piece()"
    check_shard_entry(entry, label)
    have, at = entry["local"], list(entry["offsets"])
    if len(offsets) != have.dim() or len(shape) != have.dim():
        raise ValueError(f"{label}: asked for a {len(shape)}-d piece of a {have.dim()}-d tensor")
    index = []
    for d, (want, size) in enumerate(zip(offsets, shape, strict=True)):
        start = want - at[d]
        if start < 0 or start + size > have.shape[d]:
            raise ValueError(
                f"{label}: this rank needs elements {want}..{want + size} of dim {d}, but the checkpoint gives "
                f"{at[d]}..{at[d] + have.shape[d]} (of {entry['global_shape'][d]}). The layout changed since the "
                "save: load with reshard=True to assemble the full tensor from every saved shard")
        index.append(slice(start, start + size))
    return have[tuple(index)]


# ---- when a load needs it ------------------------------------------------------------------------

def needs_reshard(entry: ComponentEntry, saved: Topology, topo: RankTopology) -> bool:
    """Whether this rank has no copy of its own of a component saved under `saved`'s layout."""
    return placement_for(entry.pattern).needs_reshard(saved, entry.replica_sets, topo, entry.process_group)


def read_merged(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, verify: bool,
                threads: int = 1) -> Any:
    """Every saved copy of `key`, read and merged into one state dict (see the module docstring)."""
    owners = sorted({f.owner for f in entry.files}, key=lambda o: -1 if o is None else o)
    copies = {o: read_component(storage, ckpt_dir, key, entry, o, verify, threads=threads) for o in owners}
    return merge_copies(key, copies, entry.pattern, ckpt_dir)


def merge_copies(key: str, copies: Mapping[int | None, Any], pattern: SharingPattern = SharingPattern.PER_RANK,
                 ckpt_dir: str | None = None) -> Any:
    """One state dict from several copies: dicts by key, shard entries assembled, other values equal."""
    if not copies:
        raise CheckpointError(f"component {key!r} has no saved copy to load", path=ckpt_dir)
    return _Merger(key, pattern, ckpt_dir).merge("", list(copies.items()))


class _Merger:
    def __init__(self, key: str, pattern: SharingPattern, ckpt_dir: str | None):
        self.key, self.ckpt_dir, self.what = key, ckpt_dir, placement_for(pattern).copy_word or "copy"

    def fail(self, path: str, why: str) -> CheckpointError:
        return CheckpointError(f"component {self.key!r} cannot be resharded: key {path or '(root)'!r} {why}",
                               path=self.ckpt_dir)

    def merge(self, path: str, values: list[tuple[int | None, Any]]) -> Any:
        if len(values) == 1:
            return values[0][1]
        marked = [is_shard_entry(v) for _, v in values]
        if all(marked):
            return self.assemble(path, values)
        if any(marked):
            raise self.fail(path, "is a shard entry in some copies and a plain value in others")
        if all(isinstance(v, Mapping) for _, v in values):
            return self.merge_dicts(path, values)
        first_owner, first = values[0]
        for owner, value in values[1:]:
            if not _equal(first, value):
                raise self.fail(path, f"differs between the saved copies of {self.what} {first_owner} and "
                                      f"{self.what} {owner}, so it is state of one {self.what} that has no place "
                                      "in the new layout. Leave this component out of the load (strict=False), "
                                      "or rebuild it (a trainer's layout-change policy does this for RNG and data)")
        return first

    def merge_dicts(self, path: str, values: list[tuple[int | None, Any]]) -> Any:
        names: dict[Any, None] = {}
        for _, value in values:
            names.update(dict.fromkeys(value))
        merged = {name: self.merge(f"{path}/{name}" if path else str(name),
                                   [(o, v[name]) for o, v in values if name in v]) for name in names}
        return OrderedDict(merged) if isinstance(values[0][1], OrderedDict) else merged

    def assemble(self, path: str, values: list[tuple[int | None, Any]]) -> dict[str, Any]:
        entries = []
        for owner, value in values:
            try:
                check_shard_entry(value, f"component {self.key!r}, key {path!r}")
            except ValueError as exc:
                raise self.fail(path, f"in the copy of {self.what} {owner} is not a valid shard entry ({exc})") from None
            entries.append((owner, value))
        shape = list(entries[0][1]["global_shape"])
        dtype = entries[0][1]["local"].dtype
        for owner, e in entries:
            if list(e["global_shape"]) != shape or e["local"].dtype != dtype:
                raise self.fail(path, f"is a {e['local'].dtype} piece of {list(e['global_shape'])} in the copy of "
                                      f"{self.what} {owner} but a {dtype} piece of {shape} in another")
        boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int | None, torch.Tensor]] = {}
        for owner, e in entries:
            box = (tuple(e["offsets"]), tuple(e["local"].shape))
            if box in boxes:
                if not _equal(boxes[box][1], e["local"]):
                    raise self.fail(path, f"is saved twice for the same elements (offsets {list(box[0])}) by "
                                          f"{self.what} {boxes[box][0]} and {self.what} {owner}, with different values")
                continue
            boxes[box] = (owner, e["local"])
        distinct = [b for b in boxes if math.prod(b[1]) > 0]
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                if _overlap(a, b):
                    raise self.fail(path, f"has saved pieces at offsets {list(a[0])} and {list(b[0])} that overlap "
                                          "without being the same piece; the shards do not come from one layout")
        if sum(math.prod(b[1]) for b in distinct) != math.prod(shape):
            raise self.fail(path, f"has saved pieces covering {sum(math.prod(b[1]) for b in distinct)} of the "
                                  f"{math.prod(shape)} elements of its full shape {shape}; a shard is missing")
        full = torch.empty(shape, dtype=dtype)
        for box in distinct:
            full[tuple(slice(o, o + n) for o, n in zip(*box, strict=True))] = boxes[box][1]
        return {SHARD_MARK: _SHARD_VERSION, "local": full, "offsets": [0] * len(shape), "global_shape": shape}


def _overlap(a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    return all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True))


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of state values (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


__all__ = ["check_shard_entry", "is_shard_entry", "local_piece", "merge_copies", "needs_reshard", "read_merged",
           "shard_entry"]
