"""Reading a SHARDED component back on one rank: which byte ranges of which saved pieces fill each target
shard, the check of those bytes against the pieces' block digests, and the copy of the values into place.

Every piece's bytes are digested in blocks at save time (`digests.BlockHasher`, manifest format_version 3).
A read checks every block it touches; where it needs only part of a block (a range that starts or ends inside
one), it reads the rest of that block too, so the check covers exactly what the digest covers (at most one
block more at each end of a range). A version-2 manifest has no piece digests; its ranged reads check the
file's size only.

Two ways to read, the same ranges and the same checks:
- a local file is mapped read-only: the read phase hashes the needed blocks where they lie in the page cache
  and stages the mappings (`MappedShards`); only once every rank agreed to apply does `read()` copy the
  values from the mapped bytes straight into the live local shards (a fresh tensor only where a live one
  cannot take them: another dtype, not contiguous, or no live tensor). One copy, no fresh allocation.
- any other file (an object store's stream) is read range by range into fresh tensors in the read phase.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..errors import CheckpointError, CorruptCheckpointError
from ..format.manifest import ComponentEntry, SavedPiece, ShardedTensor
from ..format.serialization import unflatten_state
from ..format.tensor_io import ST_TO_DTYPE, read_blob, read_header
from ..io.storage import Storage
from ..io.threads import parallel_map
from ..load.loading import DeferredRead, checked_path
from .boxes import Box, piece_overlaps, whole
from .dtensor import is_dtensor, like, local_box


@dataclass(frozen=True)
class Target:
    """What this rank wants of one saved tensor: the box of its local shard, the live DTensor to rebuild
    around it (None for a plain tensor), and the live local tensor the values may be copied straight into
    (None where it cannot take them)."""

    box: Box
    like: Any = None
    live: torch.Tensor | None = None


@dataclass(frozen=True)
class RangeRead:
    """One byte range of one file, where its elements land in a target, and the saved piece it lies in."""

    name: str
    file: str
    begin: int
    end: int
    region: Box
    strides: tuple[int, ...]
    piece: SavedPiece

    @property
    def span(self) -> tuple[int, int]:
        """The bytes a checked read fetches: [begin, end) widened to whole digest blocks of its piece."""
        p = self.piece
        if p.digests is None or self.end <= self.begin:
            return self.begin, self.end
        lo = p.begin + (self.begin - p.begin) // p.block * p.block
        return lo, min(p.begin + -(-(self.end - p.begin) // p.block) * p.block, p.end)


def plan_reads(key: str, saved: Mapping[str, ShardedTensor], targets: Mapping[str, Target]) -> list[RangeRead]:
    """The byte ranges that fill every target, from the manifest alone. Raises if the pieces do not cover one."""
    reads: list[RangeRead] = []
    for name, target in targets.items():
        t = saved[name]
        itemsize = ST_TO_DTYPE[t.dtype].itemsize
        covered = 0
        for piece in t.pieces:
            for ov in piece_overlaps(Box(piece.offsets, piece.lengths), piece.start, piece.stop, target.box):
                reads.append(RangeRead(name, piece.file, piece.begin + ov.first * itemsize,
                                       piece.begin + ov.last * itemsize, ov.region, ov.strides, piece))
                covered += ov.region.numel
        if covered != target.box.numel:
            raise CorruptCheckpointError(
                f"component {key!r}: the saved pieces of tensor {name!r} cover {covered} of the {target.box.numel} "
                f"elements this rank needs (box at {list(target.box.offsets)} of {list(target.box.lengths)}); the "
                "manifest is inconsistent", component=key)
    return reads


def merged_spans(reads: Sequence[RangeRead]) -> dict[str, list[list[int]]]:
    """The bytes a load fetches, by file: each read's span, overlapping and adjacent spans joined."""
    out: dict[str, list[list[int]]] = {}
    for r in sorted(reads, key=lambda r: (r.file, r.span)):
        lo, hi = r.span
        spans = out.setdefault(r.file, [])
        if spans and spans[-1][1] >= lo:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return out


def targets_for(key: str, saved: Mapping[str, ShardedTensor], live: Mapping[str, Any] | None) -> dict[str, Target]:
    """This rank's target for every saved tensor, from the live state's tensors by name (a DTensor's local box
    under today's mesh and placements; a plain tensor, or a name the live state lacks, as the whole tensor).
    A live tensor whose full shape differs from the saved one is refused, naming it."""
    targets = {}
    for name, t in saved.items():
        have = (live or {}).get(name)
        shape = tuple(have.shape) if isinstance(have, torch.Tensor) else t.shape
        if shape != t.shape:
            raise CheckpointError(
                f"component {key!r}, tensor {name!r}: the checkpoint holds shape {list(t.shape)}, the live state "
                f"{list(shape)}; nothing was loaded. Build the model with the saved configuration", component=key)
        box = local_box(have) if is_dtensor(have) else whole(t.shape)
        targets[name] = Target(box, have if is_dtensor(have) else None, _takes(have, box, ST_TO_DTYPE[t.dtype]))
    return targets


def _takes(have: Any, box: Box, dtype: torch.dtype) -> torch.Tensor | None:
    """The live local tensor of `have` when the values of `box` can be copied straight into it."""
    if not isinstance(have, torch.Tensor):
        return None
    with torch.no_grad():
        local = (have.to_local() if is_dtensor(have) else have).detach()
    if (local.device.type == "cpu" and local.dtype == dtype and tuple(local.shape) == box.lengths
            and local.is_contiguous()):
        return local
    return None


# ---- checks ----------------------------------------------------------------------------------------

def check_blocks(key: str, path: str, r: RangeRead, data: memoryview, at: int, done: set[tuple[int, int]]) -> None:
    """Check the digest blocks of `r`'s piece inside `r.span` (`data` holds the file's bytes from offset `at`);
    blocks in `done` were checked already, and the ones checked here are added."""
    bad = _bad_block(r, data, at, done)
    if bad is not None:
        raise CorruptCheckpointError(
            f"file {path} (component {key!r}): {_damage(r, bad)} do not match their digest in the manifest: the file "
            "changed after it was written; nothing was loaded. Restore the file, or load another checkpoint",
            path=path, component=key, key_path=r.name)


def _bad_block(r: RangeRead, data: memoryview, at: int, done: set[tuple[int, int]]) -> tuple[int, int] | None:
    """The bytes [begin, end) of the first block of `r.span` whose digest differs from the manifest's."""
    p = r.piece
    if p.digests is None:
        return None
    lo, hi = r.span
    for k in range((lo - p.begin) // p.block, -(-(hi - p.begin) // p.block)):
        if (p.begin, k) in done:
            continue
        b0 = p.begin + k * p.block
        b1 = min(b0 + p.block, p.end)
        if xxhash.xxh3_128_hexdigest(data[b0 - at: b1 - at]) != p.digests[k]:
            return b0, b1
        done.add((p.begin, k))
    return None


def _damage(r: RangeRead, block: tuple[int, int]) -> str:
    p = r.piece
    return (f"bytes {block[0]}..{block[1]} of tensor {r.name!r} (its piece at offsets {list(p.offsets)} of "
            f"{list(p.lengths)})")


def _check_size(storage: Storage, path: str, expected: int, key: str) -> None:
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"file {path} (component {key!r}) is missing", path=path, component=key) from None
    if size != expected:
        raise CorruptCheckpointError(f"file {path} (component {key!r}) has {size} bytes, the manifest says {expected}; "
                                     "it was truncated or replaced after the save", path=path, component=key)


def _by_file(reads: Sequence[RangeRead]) -> list[tuple[str, list[RangeRead]]]:
    by: dict[str, list[RangeRead]] = {}
    for r in reads:
        by.setdefault(r.file, []).append(r)
    return [(f, sorted(rs, key=lambda r: r.begin)) for f, rs in sorted(by.items())]


# ---- streamed: into fresh tensors in the read phase -------------------------------------------------

def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory, writable, as bytes."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def _readinto(f: Any, view: memoryview, path: str, key: str) -> None:
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:])
        if not n:
            raise CorruptCheckpointError(f"file {path} (component {key!r}) ended early", path=path, component=key)
        pos += n


def _dest(local: torch.Tensor, r: RangeRead, target: Target) -> torch.Tensor:
    return local[r.region.slices(target.box.offsets)]


def read_targets(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, targets: Mapping[str, Target],
                 threads: int = 1, verify: bool = True) -> dict[str, torch.Tensor]:
    """Each target's local tensor, new, filled from only the byte ranges of the saved pieces that overlap it
    (each checked against its piece's block digests, with `verify`)."""
    saved = entry.tensors or {}
    locals_ = {n: torch.empty(t.box.lengths, dtype=ST_TO_DTYPE[saved[n].dtype]) for n, t in targets.items()}
    files = {f.path: f for f in entry.files}

    def read_file(item: tuple[str, list[RangeRead]]) -> None:
        path = checked_path(ckpt_dir, files[item[0]], key)
        _check_size(storage, path, files[item[0]].nbytes, key)
        done: set[tuple[int, int]] = set()
        with storage.open_read(path) as f:
            for r in item[1]:
                dest = _dest(locals_[r.name], r, targets[r.name])
                lo, hi = r.span if verify else (r.begin, r.end)
                f.seek(lo)
                if (lo, hi) == (r.begin, r.end) and dest.is_contiguous() and hi - lo == dest.numel() * dest.element_size():
                    view = _bytes_of(dest)  # the same elements in the same order: straight in, no copy
                    _readinto(f, view, path, key)
                else:
                    buf = torch.empty(hi - lo, dtype=torch.uint8)
                    view = _bytes_of(buf)
                    _readinto(f, view, path, key)
                    dest.copy_(buf[r.begin - lo: r.end - lo].view(dest.dtype).as_strided(r.region.lengths, r.strides))
                if verify:
                    check_blocks(key, path, r, view, lo, done)

    parallel_map(read_file, _by_file(plan_reads(key, saved, targets)), threads, "ckpt-read")
    return locals_


# ---- mapped: checked in the read phase, copied into place at apply -----------------------------------

def _map(storage: Storage, path: str, size: int) -> mmap.mmap | None:
    """A read-only map of a local file of `size` bytes; None where the file cannot be mapped (an object
    store's stream). Checkpoint files are never rewritten in place (a save writes new files and renames,
    retention unlinks), so the mapped bytes stay the ones checked until the copy."""
    with storage.open_read(path) as f:
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        try:
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class _MappedFile:
    path: str
    mapped: mmap.mmap
    reads: tuple[RangeRead, ...]


@dataclass(frozen=True)
class MappedShards(DeferredRead):
    """A SHARDED component whose needed blocks were checked over read-only maps of its files; `read()` copies
    the values into the targets' live local shards (captured when the targets were taken; `into` is not
    needed) and rebuilds the state, once every rank agreed to apply."""

    key: str
    files: tuple[_MappedFile, ...]
    targets: Mapping[str, Target]
    dtypes: Mapping[str, torch.dtype]
    state_bytes: bytes
    state_path: str
    threads: int

    def read(self, into: Mapping[str, torch.Tensor] | None = None) -> Any:
        locals_ = {n: t.live if t.live is not None else torch.empty(t.box.lengths, dtype=self.dtypes[n])
                   for n, t in self.targets.items()}
        with warnings.catch_warnings():  # the maps are read-only, and only ever read from
            warnings.simplefilter("ignore", UserWarning)
            sources = [torch.frombuffer(m.mapped, dtype=torch.uint8) for m in self.files]

        def copy(i: int) -> None:
            src = sources[i]
            for r in self.files[i].reads:
                dest = _dest(locals_[r.name], r, self.targets[r.name])
                with torch.no_grad():
                    dest.copy_(src[r.begin: r.end].view(dest.dtype).as_strided(r.region.lengths, r.strides))

        try:
            parallel_map(copy, range(len(self.files)), self.threads, "ckpt-copy")
        finally:
            sources.clear()
            for m in self.files:
                with contextlib.suppress(BufferError):  # a view still held (by a traceback) closes it later
                    m.mapped.close()
        tensors = {n: _rebuilt(locals_[n], t) for n, t in self.targets.items()}
        return unflatten_state(self.state_bytes, tensors, self.key, source=self.state_path)


def _rebuilt(local: torch.Tensor, target: Target) -> Any:
    """What the state holds for a target: the live tensor itself where the values went straight into it (so
    `load_state_dict()` copies it onto itself, which torch skips), else a new one around `local`."""
    if target.live is not None:
        return target.like if target.like is not None else target.live
    return like(local, target.like) if target.like is not None else local


def map_and_check(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, targets: Mapping[str, Target],
                  verify: bool, threads: int = 1) -> list[_MappedFile] | None:
    """Every needed file mapped, with the blocks the reads touch checked (with `verify`); None (and nothing
    kept) where a file cannot be mapped."""
    files = {f.path: f for f in entry.files}
    items = _by_file(plan_reads(key, entry.tensors or {}, targets))

    def one(item: tuple[str, list[RangeRead]]) -> _MappedFile | None:
        path = checked_path(ckpt_dir, files[item[0]], key)
        _check_size(storage, path, files[item[0]].nbytes, key)
        mapped = _map(storage, path, files[item[0]].nbytes)
        if mapped is None:
            return None
        try:
            if verify:
                view = memoryview(mapped)
                try:
                    done: set[tuple[int, int]] = set()
                    for r in item[1]:
                        check_blocks(key, path, r, view, 0, done)
                finally:
                    view.release()
        except BaseException:
            mapped.close()
            raise
        return _MappedFile(path, mapped, tuple(item[1]))

    mapped = parallel_map(one, items, threads, "ckpt-verify")
    if any(m is None for m in mapped):
        for m in mapped:
            if m is not None:
                m.mapped.close()
        return None
    return mapped  # type: ignore[return-value]


def read_sharded(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, live: Mapping[str, Any] | None,
                 verify: bool, threads: int = 1) -> Any:
    """The state of a SHARDED component for this rank (`live`: the component's current tensors by name): a
    `MappedShards` to copy into place at apply where its files can be mapped, else the state itself, each
    tensor read into a new one from only the byte ranges that overlap its target."""
    targets = targets_for(key, entry.tensors or {}, live)
    skeleton = [f for f in entry.files if f.kind == "state"]
    if len(skeleton) != 1:
        raise CorruptCheckpointError(f"component {key!r} in {ckpt_dir} has {len(skeleton)} state files (expected 1)",
                                     path=ckpt_dir, component=key)
    s = skeleton[0]
    state_path = checked_path(ckpt_dir, s, key)
    raw = read_blob(storage, state_path, s.nbytes, s.xxh3_128 if verify else None, key)
    dtypes = {n: ST_TO_DTYPE[t.dtype] for n, t in (entry.tensors or {}).items()}
    unflatten_state(raw, {n: torch.empty(t.box.lengths, dtype=dtypes[n], device="meta")
                          for n, t in targets.items()}, key, source=state_path)  # decodes, or fails now
    mapped = map_and_check(storage, ckpt_dir, key, entry, targets, verify, threads)
    if mapped is not None:
        return MappedShards(key, tuple(mapped), targets, dtypes, raw, state_path, threads)
    locals_ = read_targets(storage, ckpt_dir, key, entry, targets, threads, verify)
    tensors = {n: like(locals_[n], t.like) if t.like is not None else locals_[n] for n, t in targets.items()}
    return unflatten_state(raw, tensors, key, source=state_path)


def check_sharded(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry) -> None:
    """Everything a load checks about a SHARDED component apart from digests, without reading tensor data:
    each tensor file's header, pieces that cover every tensor, and the state file decoding over the tensors
    the manifest lists. Raises CorruptCheckpointError naming the file."""
    saved = entry.tensors or {}
    for f in entry.files:
        if f.kind == "tensors":
            read_header(storage, checked_path(ckpt_dir, f, key), f.nbytes, key)
    plan_reads(key, saved, {n: Target(whole(t.shape)) for n, t in saved.items()})
    skeleton = [f for f in entry.files if f.kind == "state"]
    if len(skeleton) != 1:
        raise CorruptCheckpointError(f"component {key!r} in {ckpt_dir} has {len(skeleton)} state files (expected 1)",
                                     path=ckpt_dir, component=key)
    path = checked_path(ckpt_dir, skeleton[0], key)
    raw = read_blob(storage, path, skeleton[0].nbytes, None, key)
    unflatten_state(raw, {n: torch.empty(t.shape, dtype=ST_TO_DTYPE[t.dtype], device="meta") for n, t in saved.items()},
                    key, source=path)


def damaged_pieces(storage: Storage, path: str, key: str, entry: ComponentEntry, file: str) -> list[str]:
    """Every piece stored in `file` (at `path`) checked whole against its block digests, one block in memory at a
    time (what `ckpt verify` does; a load checks only the blocks it reads): one line per damaged piece, naming
    its tensor and bytes."""
    pieces = sorted(((name, p) for name, t in (entry.tensors or {}).items() for p in t.pieces
                     if p.file == file and p.digests is not None), key=lambda item: item[1].begin)
    bad = []
    with storage.open_read(path) as f:
        for name, p in pieces:
            f.seek(p.begin)
            for k, digest in enumerate(p.digests or ()):
                buf = bytearray(min(p.block, p.end - p.begin - k * p.block))
                _readinto(f, memoryview(buf), path, key)
                if xxhash.xxh3_128_hexdigest(buf) != digest:
                    r = RangeRead(name, file, p.begin, p.end, Box(p.offsets, p.lengths), (), p)
                    bad.append(_damage(r, (p.begin + k * p.block, p.begin + k * p.block + len(buf))))
                    break
    return bad


__all__ = [
    "MappedShards",
    "RangeRead",
    "Target",
    "check_blocks",
    "damaged_pieces",
    "map_and_check",
    "merged_spans",
    "plan_reads",
    "read_sharded",
    "read_targets",
    "targets_for",
]
