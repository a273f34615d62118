"""Full tensors of a component, reassembled from however it was saved, read one tensor at a time.

An export to another format needs each tensor whole, under its real name, without holding the whole model:
- `plan_component` looks only at the manifest and the small msgpack skeletons and says, for every tensor,
  where its pieces are (which copy, which stored tensor, which box of the full tensor);
- `TensorReader.materialize` reads just those pieces (each file's digest is checked once, by streaming it)
  and returns the full tensor.

How the pieces are found is one function per sharing pattern (`PIECE_FINDERS`): GLOBAL and REPLICATED have one
copy for the job (REPLICATED tensors split across writers are put back by the reader); PER_RANK, PER_GROUP and
PER_NODE have one copy per rank, group or node, merged by tensor name (pipeline stages keyed by parameter
name add up to the whole model; the same name in several copies must hold the same values), and a shard entry
(`ckpt.shard_entry`: a tensor-parallel piece with its offsets) becomes one piece of its full tensor.
SHARDED lists every tensor with its full shape in the manifest; its reader assembles each one from the byte ranges
of its saved pieces. A pattern with another layout on disk adds its own finder.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..component import SharingPattern
from ..errors import CheckpointError, CorruptCheckpointError
from ..format.manifest import ComponentEntry, FileEntry
from ..format.serialization import join_path, unflatten_state
from ..format.tensor_io import ST_TO_DTYPE, parse_header
from ..load.loading import checked_path
from ..load.reshard import check_shard_entry, is_shard_entry
from ..patterns.boxes import whole
from ..patterns.sharded import Target, read_targets
from .inspection import Opened, copy_label, owners, read_skeleton, state_file

_HASH_CHUNK = 8 << 20
Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape) inside the full tensor


@dataclass(frozen=True)
class Piece:
    """Where one piece of a full tensor is stored: a tensor of one copy (`owner`), the whole tensor when `box` is
    None, else the box (offsets, shape) it fills."""

    owner: int | None
    stored: str
    box: Box | None = None


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the export: its name, real dtype, full shape and where its pieces are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ComponentPlan:
    """Every tensor of a component in state-dict order, and the key paths of the values that are not tensors."""

    key: str
    pattern: SharingPattern
    tensors: tuple[PlannedTensor, ...]
    non_tensor: tuple[str, ...]


# ---- planning: one finder per pattern ------------------------------------------------------------

def _meta_state(ck: Opened, key: str, owner: int | None) -> Any:
    """The copy's state dict rebuilt over meta tensors (dtype and shape, no data), from its skeleton."""
    entry = ck.manifest.components[key]
    stored = {t.name: torch.empty(t.chunk.shape if t.chunk else t.shape, device="meta", dtype=ST_TO_DTYPE[t.dtype])
              for f in entry.files_for(owner) if f.kind == "tensors" for t in f.tensors}
    if state_file(entry, owner) is None:
        return stored
    return unflatten_state(read_skeleton(ck, key, owner), stored, key)


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every tensor, shard entry and other leaf, in state-dict order."""
    if is_shard_entry(value) or not isinstance(value, Mapping | list | tuple):
        yield path or "(root)", value
        return
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for k, v in items:
        yield from _leaves(v, join_path(path, k))


def _copy_pieces(ck: Opened, key: str, owner: int | None, found: dict[str, list], other: list[str]) -> None:
    """Add one copy's tensors (and shard entries) to `found`: name -> [(dtype, full shape, piece)]."""
    for path, value in _leaves(_meta_state(ck, key, owner)):
        if is_shard_entry(value):
            check_shard_entry(value, f"component {key!r}, key {path!r}")
            local = value["local"]
            box = (tuple(value["offsets"]), tuple(local.shape))
            found.setdefault(path, []).append((local.dtype, tuple(value["global_shape"]),
                                               Piece(owner, join_path(path, "local"), box)))
        elif isinstance(value, torch.Tensor):
            found.setdefault(path, []).append((value.dtype, tuple(value.shape), Piece(owner, path)))
        elif path not in other:
            other.append(path)


def single_copy(ck: Opened, key: str, entry: ComponentEntry, found: dict[str, list], other: list[str]) -> None:
    """GLOBAL, REPLICATED: the job's one copy."""
    _copy_pieces(ck, key, None, found, other)


def every_copy(ck: Opened, key: str, entry: ComponentEntry, found: dict[str, list], other: list[str]) -> None:
    """PER_RANK, PER_GROUP, PER_NODE: every saved copy, merged by tensor name."""
    for owner in owners(entry):
        _copy_pieces(ck, key, owner, found, other)


def sharded_pieces(ck: Opened, key: str, entry: ComponentEntry, found: dict[str, list], other: list[str]) -> None:
    """SHARDED: the manifest lists every tensor with its full shape; the reader assembles it from the byte
    ranges of its saved pieces (`ckpt.patterns.sharded`), so the plan holds one whole piece per tensor."""
    for name, t in (entry.tensors or {}).items():
        found.setdefault(name, []).append((ST_TO_DTYPE[t.dtype], tuple(t.shape), Piece(None, name)))
    for path, value in _leaves(_meta_state(ck, key, None)):
        if not isinstance(value, torch.Tensor) and path not in found and path not in other:
            other.append(path)


PieceFinder = Callable[[Opened, str, ComponentEntry, dict, list], None]
PIECE_FINDERS: dict[SharingPattern, PieceFinder] = {
    SharingPattern.GLOBAL: single_copy,
    SharingPattern.REPLICATED: single_copy,
    SharingPattern.PER_RANK: every_copy,
    SharingPattern.PER_GROUP: every_copy,
    SharingPattern.PER_NODE: every_copy,
    SharingPattern.SHARDED: sharded_pieces,
}


def plan_component(ck: Opened, key: str) -> ComponentPlan:
    """Where every tensor of component `key` is, checked for consistency (no tensor data is read)."""
    entry = ck.manifest.components.get(key)
    if entry is None:
        raise CheckpointError(f"{ck.path} has no component {key!r}; it has {sorted(ck.manifest.components)}",
                              path=ck.path)
    finder = PIECE_FINDERS.get(entry.pattern)
    if finder is None:
        raise CheckpointError(f"component {key!r} is {entry.pattern.name}, which this export cannot reassemble yet",
                              path=ck.path)
    found: dict[str, list] = {}
    other: list[str] = []
    finder(ck, key, entry, found, other)
    tensors = tuple(_planned(key, entry.pattern, name, items) for name, items in found.items())
    return ComponentPlan(key, entry.pattern, tensors, tuple(p for p in other if p not in found))


def _planned(key: str, pattern: SharingPattern, name: str, items: list) -> PlannedTensor:
    dtype, shape = items[0][0], items[0][1]
    for d, s, piece in items[1:]:
        if (d, s) != (dtype, shape):
            raise CheckpointError(f"component {key!r}: tensor {name!r} is {_form(dtype, shape)} in "
                                  f"{_label(pattern, items[0][2].owner)} but {_form(d, s)} in {_label(pattern, piece.owner)};"
                                  " the copies do not belong to one model")
    pieces = tuple(p for _, _, p in items)
    boxes = [p.box for p in pieces]
    if any(b is not None for b in boxes):
        if any(b is None for b in boxes):
            raise CheckpointError(f"component {key!r}: tensor {name!r} is a shard entry in some copies and a whole "
                                  "tensor in others")
        _check_cover(key, name, shape, {b for b in boxes if b is not None})
    return PlannedTensor(name, dtype, shape, pieces)


def _check_cover(key: str, name: str, shape: tuple[int, ...], boxes: set[Box]) -> None:
    """The distinct boxes tile the full tensor exactly: no overlap, nothing missing."""
    distinct = sorted(b for b in boxes if math.prod(b[1]) > 0)
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True)):
                raise CheckpointError(f"component {key!r}: tensor {name!r} has saved pieces at offsets {list(a[0])} "
                                      f"and {list(b[0])} that overlap; the shards do not come from one layout")
    covered = sum(math.prod(b[1]) for b in distinct)
    if covered != math.prod(shape):
        raise CheckpointError(f"component {key!r}: tensor {name!r} has saved pieces covering {covered} of the "
                              f"{math.prod(shape)} elements of its full shape {list(shape)}; a shard is missing")


def _form(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def _label(pattern: SharingPattern, owner: int | None) -> str:
    return copy_label(pattern, owner) or "the single copy"


# ---- reading ---------------------------------------------------------------------------------------

class TensorReader:
    """Reads single stored tensors of one component out of its files, checking each file's digest once."""

    def __init__(self, ck: Opened, key: str):
        self.ck, self.key = ck, key
        self.entry = ck.manifest.components[key]
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # file -> (data start, header entries)
        self._where: dict[tuple[int | None, str], list[tuple[FileEntry, Any]]] = {}
        for f in self.entry.files:
            if f.kind == "tensors":
                for t in f.tensors:
                    self._where.setdefault((f.owner, t.name), []).append((f, t))

    def materialize(self, planned: PlannedTensor) -> torch.Tensor:
        """The full tensor: its pieces read and put in place (pieces saved twice must be equal)."""
        if self.entry.pattern is SharingPattern.SHARDED:
            saved = (self.entry.tensors or {})[planned.name]
            target = {planned.name: Target(whole(saved.shape))}
            return read_targets(self.ck.storage, self.ck.path, self.key, self.entry, target)[planned.name]
        if planned.pieces[0].box is None:
            first = self.stored(planned.pieces[0], planned.dtype)
            for piece in planned.pieces[1:]:
                self._same(planned, planned.pieces[0], first, piece, self.stored(piece, planned.dtype))
            return first
        full = torch.empty(planned.shape, dtype=planned.dtype)
        placed: dict[Box, tuple[Piece, torch.Tensor]] = {}
        for piece in planned.pieces:
            value = self.stored(piece, planned.dtype)
            if piece.box in placed:
                self._same(planned, placed[piece.box][0], placed[piece.box][1], piece, value)
                continue
            placed[piece.box] = (piece, value)
            offsets, shape = piece.box
            full[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))] = value
        return full

    def _same(self, planned: PlannedTensor, a: Piece, ta: torch.Tensor, b: Piece, tb: torch.Tensor) -> None:
        if ta.numel() and not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            pattern = self.entry.pattern
            raise CheckpointError(f"component {self.key!r}: tensor {planned.name!r} differs between "
                                  f"{_label(pattern, a.owner)} and {_label(pattern, b.owner)}, so there is no one "
                                  "value to export; export a single copy with `ckpt export --rank R` instead",
                                  path=self.ck.path)

    def stored(self, piece: Piece, dtype: torch.dtype) -> torch.Tensor:
        """One stored tensor (put back together when it was split across writers), in its real dtype."""
        where = self._where.get((piece.owner, piece.stored))
        if not where:
            raise CorruptCheckpointError(f"component {self.key!r}: tensor {piece.stored!r} is in the skeleton but in "
                                         "no file the manifest lists", path=self.ck.path, component=self.key)
        first = where[0][1]
        st = ST_TO_DTYPE[first.dtype]
        if first.chunk is None:
            value = self._read(where[0][0], piece.stored, torch.empty(first.shape, dtype=st))
        else:
            value = torch.empty(first.chunk.shape, dtype=st)
            flat, filled = value.view(-1), 0
            for f, t in sorted(where, key=lambda w: w[1].chunk.start):
                if t.chunk.start != filled:
                    break
                self._read(f, piece.stored, flat[t.chunk.start: t.chunk.stop])
                filled = t.chunk.stop
            if filled != value.numel():
                raise CorruptCheckpointError(f"component {self.key!r}: the pieces of tensor {piece.stored!r} do not "
                                             "cover it exactly once; the manifest is inconsistent", path=self.ck.path,
                                             component=self.key)
        if value.dtype != dtype:  # kept as raw bytes: uint8[..., element size]
            value = value.view(dtype).squeeze(-1)
        return value

    def _read(self, f: FileEntry, name: str, into: torch.Tensor) -> torch.Tensor:
        start, entries = self._header(f)
        e = entries[name]
        if e.dtype != into.dtype or list(e.shape) != list(into.shape):
            raise CorruptCheckpointError(f"file {f.path}: tensor {name!r} is {e.dtype}{e.shape}, the manifest says "
                                         f"{into.dtype}{list(into.shape)}", path=f.path, component=self.key)
        if into.numel():
            view = memoryview(into.view(-1).view(torch.uint8).numpy()).cast("B")
            with self.ck.storage.open_read(checked_path(self.ck.path, f, self.key)) as fh:
                fh.seek(start + e.begin)
                pos = 0
                while pos < len(view):
                    n = fh.readinto(view[pos:])
                    if not n:
                        raise CorruptCheckpointError(f"file {f.path} ended early", path=f.path, component=self.key)
                    pos += n
        return into

    def _header(self, f: FileEntry) -> tuple[int, dict[str, Any]]:
        """The file's tensor entries by name, after its size and digest were checked against the manifest."""
        if f.path not in self._headers:
            path = checked_path(self.ck.path, f, self.key)
            self._check_digest(f, path)
            with self.ck.storage.open_read(path) as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = fh.read(length)
            entries = parse_header(header, f.nbytes - 8 - length, path, self.key)
            self._headers[f.path] = (8 + length, {e.name: e for e in entries})
        return self._headers[f.path]

    def _check_digest(self, f: FileEntry, path: str) -> None:
        size = self.ck.storage.size(path)
        hasher = xxhash.xxh3_128()
        with self.ck.storage.open_read(path) as fh:
            while chunk := fh.read(_HASH_CHUNK):
                hasher.update(chunk)
        if size != f.nbytes or hasher.hexdigest() != f.xxh3_128:
            raise CorruptCheckpointError(f"file {path} (component {self.key!r}) does not match the manifest "
                                         f"({size} bytes, the manifest says {f.nbytes}, or its digest differs): its "
                                         "bytes changed after it was written; `ckpt verify` lists every damaged file",
                                         path=path, component=self.key)


__all__ = ["PIECE_FINDERS", "ComponentPlan", "Piece", "PlannedTensor", "TensorReader", "every_copy",
           "plan_component", "single_copy"]
