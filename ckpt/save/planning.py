"""Deciding who writes what. Pure functions of data every rank holds, so every rank gets the same plan.

Each rank declares its components (pattern, group, tensor sizes); from all declarations the plan names,
for each component, its replica sets and every file: path, writer rank, owner, and which tensors.
REPLICATED and PER_GROUP tensors are spread over a replica set's members, balanced by bytes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..component import SharingPattern, ValidationLevel
from ..errors import CheckpointError, ReplicationError
from ..format.tensor_io import ST_TO_DTYPE
from ..patterns.base import tensor_layout_for
from ..patterns.boxes import Box
from ..patterns.placements import placement_for
from ..patterns.sharded import STATE_FILE, ShardMeta, shard_file
from ..topology import RankTopology

SKELETON_EXT = ".msgpack"
TENSORS_EXT = ".safetensors"


@dataclass(frozen=True)
class ComponentDecl:
    """What one rank says about one component at save time (sent to every rank)."""

    key: str
    pattern: str
    process_group: str | None
    required: bool
    validation: str
    # (name, nbytes, itemsize) of every tensor; sent only by the lowest rank of a replica set, which plans
    # the split.
    tensor_sizes: tuple[tuple[str, int, int], ...] | None
    digest: str | None  # QUICK/TENSOR summary digest of this rank's copy
    shards: tuple[ShardMeta, ...] | None = None  # SHARDED: what this rank holds of every tensor

    def to_wire(self) -> list:
        return [self.key, self.pattern, self.process_group, self.required, self.validation,
                None if self.tensor_sizes is None else [list(t) for t in self.tensor_sizes], self.digest,
                None if self.shards is None else [s.to_wire() for s in self.shards]]

    @classmethod
    def from_wire(cls, w: list) -> ComponentDecl:
        sizes = None if w[5] is None else tuple((str(n), int(b), int(i)) for n, b, i in w[5])
        shards = None if w[7] is None else tuple(ShardMeta.from_wire(s) for s in w[7])
        return cls(w[0], w[1], w[2], w[3], w[4], sizes, w[6], shards)


_ITEMSIZE = {code: dtype.itemsize for code, dtype in ST_TO_DTYPE.items()}

# Tensors above a writer's fair share are cut into pieces no smaller than this, so one dominant tensor
# (an embedding, say) does not leave one replica writing most of the bytes.
MIN_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True, order=True)
class Piece:
    """A tensor, or the element range [start, stop) of its flattened form."""

    name: str
    start: int | None = None
    stop: int | None = None

    def to_wire(self) -> list:
        return [self.name, self.start, self.stop]

    @classmethod
    def from_wire(cls, w: list) -> Piece:
        return cls(str(w[0]), w[1], w[2])


@dataclass(frozen=True)
class FileAssignment:
    """One file to write. `pieces=None` means every tensor the writer holds for the component."""

    relpath: str
    kind: str  # "tensors" or "state"
    writer: int
    owner: int | None
    pieces: tuple[Piece, ...] | None

    def to_wire(self) -> list:
        return [self.relpath, self.kind, self.writer, self.owner,
                None if self.pieces is None else [p.to_wire() for p in self.pieces]]

    @classmethod
    def from_wire(cls, w: list) -> FileAssignment:
        pieces = None if w[4] is None else tuple(Piece.from_wire(p) for p in w[4])
        return cls(str(w[0]), str(w[1]), int(w[2]), w[3], pieces)


@dataclass(frozen=True)
class ComponentPlan:
    key: str
    pattern: SharingPattern
    process_group: str | None
    required: bool
    validation: ValidationLevel
    replica_sets: tuple[tuple[int, ...], ...]
    files: tuple[FileAssignment, ...]
    sharded: dict[str, tuple[str, tuple[int, ...]]] | None = None  # SHARDED: name -> (dtype, full shape)

    def to_wire(self) -> list:
        sharded = None if self.sharded is None else {n: [d, list(shape)] for n, (d, shape) in self.sharded.items()}
        return [self.key, self.pattern.value, self.process_group, self.required, self.validation.value,
                [list(m) for m in self.replica_sets], [f.to_wire() for f in self.files], sharded]

    @classmethod
    def from_wire(cls, w: list) -> ComponentPlan:
        sharded = None if w[7] is None else {str(n): (str(d), tuple(shape)) for n, (d, shape) in w[7].items()}
        return cls(str(w[0]), SharingPattern(w[1]), w[2], bool(w[3]), ValidationLevel(w[4]),
                   tuple(tuple(int(r) for r in m) for m in w[5]), tuple(FileAssignment.from_wire(f) for f in w[6]),
                   sharded)

    def writes_of(self, rank: int) -> tuple[FileAssignment, ...]:
        """The files `rank` writes."""
        return tuple(f for f in self.files if f.writer == rank)


def split(sizes: Sequence[tuple[str, int, int]], bins: int) -> list[tuple[Piece, int]]:
    """The pieces to spread over `bins` writers, with their bytes: whole tensors, except that a tensor
    larger than a fair share (and at least 2 x MIN_CHUNK_BYTES) is cut into element ranges."""
    total = sum(nbytes for _, nbytes, _ in sizes)
    share = max(-(-total // max(bins, 1)), MIN_CHUNK_BYTES)
    pieces: list[tuple[Piece, int]] = []
    for name, nbytes, itemsize in sizes:
        if bins > 1 and nbytes > share and nbytes >= 2 * MIN_CHUNK_BYTES and itemsize > 0:
            numel = nbytes // itemsize
            per = -(-numel // -(-nbytes // share))
            pieces += [(Piece(name, s, min(s + per, numel)), (min(s + per, numel) - s) * itemsize)
                       for s in range(0, numel, per)]
        else:
            pieces.append((Piece(name), nbytes))
    return pieces


def balance(pieces: Sequence[tuple[Piece, int]], bins: int) -> list[list[Piece]]:
    """Spread pieces over `bins` writers so each writes about the same bytes (largest first, to the
    least loaded writer; ties go to the lower index). Deterministic for the same input."""
    out: list[list[Piece]] = [[] for _ in range(bins)]
    holds: list[set[str]] = [set() for _ in range(bins)]
    # Writers by (bytes so far, index): the least loaded first, in log time (thousands of writers are common).
    heap = [(0, i) for i in range(bins)]
    for piece, nbytes in sorted(pieces, key=lambda item: (-item[1], item[0].name, item[0].start or 0)):
        # Two pieces of one tensor in one file would share a name there; `split` cuts a tensor into at most
        # `bins` pieces, so a writer without one is always left.
        skipped = []
        while heap and piece.name in holds[heap[0][1]]:
            skipped.append(heapq.heappop(heap))
        if not heap:
            raise CheckpointError(f"internal planning error: tensor {piece.name!r} was cut into more pieces than "
                                  f"there are writers ({bins}); please report this")
        load, target = heapq.heappop(heap)
        out[target].append(piece)
        holds[target].add(piece.name)
        heapq.heappush(heap, (load + nbytes, target))
        for item in skipped:
            heapq.heappush(heap, item)
    return out


def build_plan(decls: Sequence[dict[str, ComponentDecl]], topo: RankTopology) -> dict[str, ComponentPlan]:
    """The whole job's plan from every rank's declarations (index = rank)."""
    plan = {}
    for key in sorted({k for per_rank in decls for k in per_rank}):
        declaring = [r for r, per_rank in enumerate(decls) if key in per_rank]
        ref = decls[declaring[0]][key]
        for r in declaring[1:]:
            _check_agree(key, declaring[0], ref, r, decls[r][key])
        plan[key] = _plan_component(key, SharingPattern(ref.pattern), ref, declaring, decls, topo)
    return plan


def _check_agree(key: str, first: int, ref: ComponentDecl, rank: int, d: ComponentDecl) -> None:
    """Every declaring rank must describe a component the same way; the plan and manifest record one setting."""
    if (d.pattern, d.process_group) != (ref.pattern, ref.process_group):
        raise CheckpointError(
            f"component {key!r}: rank {first} declares pattern {ref.pattern} (group {ref.process_group}) but "
            f"rank {rank} declares {d.pattern} (group {d.process_group}); a component must resolve to the same "
            "pattern on every rank")
    # Checked before the replica digests are compared: ranks digesting at different levels would otherwise
    # look like replicas that drifted apart.
    for field, mine, theirs in (("validation_level", ref.validation, d.validation),
                                ("required", ref.required, d.required)):
        if mine != theirs:
            raise CheckpointError(
                f"component {key!r}: rank {first} declares {field}={mine} but rank {rank} declares "
                f"{field}={theirs}; pass the same StateComponent settings on every rank")


def _plan_component(key: str, pattern: SharingPattern, ref: ComponentDecl, declaring: list[int],
                    decls: Sequence[dict[str, ComponentDecl]], topo: RankTopology) -> ComponentPlan:
    def files_single(writer: int, owner: int | None, stem: str) -> list[FileAssignment]:
        return [FileAssignment(f"{key}/{stem}{SKELETON_EXT}", "state", writer, owner, None),
                FileAssignment(f"{key}/{stem}{TENSORS_EXT}", "tensors", writer, owner, None)]

    def need_all(ranks: Sequence[int], what: str) -> None:
        absent = sorted(set(ranks) - set(declaring))
        if absent:
            raise CheckpointError(f"component {key!r} is {pattern.name} but ranks {absent} did not pass it to "
                                  f"save(); {what} must all declare it")

    if tensor_layout_for(pattern) is not None:  # SHARDED: planned piece by piece, not copy by copy
        need_all(range(topo.world_size), f"all ranks (a {pattern.name} component spans the job)")
        files, sharded = plan_sharded(key, {r: decls[r][key].shards or () for r in declaring})
        return ComponentPlan(key, pattern, ref.process_group, ref.required, ValidationLevel(ref.validation),
                             (tuple(declaring),), tuple(files), sharded)
    placement = placement_for(pattern)
    try:
        copies = placement.copies(topo, ref.process_group, declaring)
    except CheckpointError as exc:  # e.g. no process group of the component's group name
        raise CheckpointError(f"component {key!r}: {exc}") from None
    files: list[FileAssignment] = []
    for owner, members in copies:
        need_all(members, f"the ranks holding {placement.copy_label(owner) or 'its one copy'}")
        stem = placement.stem(owner)
        if not placement.splits:
            files += files_single(members[0], owner, stem)
            continue
        sizes = decls[members[0]][key].tensor_sizes or ()
        files.append(FileAssignment(f"{key}/{stem}{SKELETON_EXT}", "state", members[0], owner, None))
        bins = balance(split(sizes, len(members)), len(members))
        parts = [(m, pieces) for m, pieces in zip(members, bins, strict=True) if pieces]
        for i, (writer, pieces) in enumerate(parts):
            files.append(FileAssignment(f"{key}/{stem}.part-{i}-of-{len(parts)}{TENSORS_EXT}", "tensors",
                                        writer, owner, tuple(pieces)))
    return ComponentPlan(key, pattern, ref.process_group, ref.required, ValidationLevel(ref.validation),
                         tuple(m for _, m in copies), tuple(files))


def plan_sharded(key: str, shards: dict[int, Sequence[ShardMeta]]
                 ) -> tuple[list[FileAssignment], dict[str, tuple[str, tuple[int, ...]]]]:
    """Files of a SHARDED component: every distinct box written once, its bytes balanced across the ranks
    that hold it (a Replicate mesh dimension, or a plain tensor every rank holds), one file per writing rank;
    the skeleton by the lowest rank. Also each tensor's dtype and full shape."""
    holders: dict[tuple[str, Box], list[int]] = {}
    meta: dict[str, ShardMeta] = {}
    for rank in sorted(shards):
        for s in shards[rank]:
            first = meta.setdefault(s.name, s)
            if (s.dtype, s.shape, s.replicated) != (first.dtype, first.shape, first.replicated):
                raise CheckpointError(
                    f"component {key!r}, tensor {s.name!r}: rank {rank} holds a {s.dtype} piece of {list(s.shape)}"
                    f"{' (plain)' if s.replicated else ''} but another rank a {first.dtype} piece of "
                    f"{list(first.shape)}{' (plain)' if first.replicated else ''}; every rank must hold the same "
                    "tensors with the same full shapes")
            holders.setdefault((s.name, s.box), []).append(rank)
    by_set: dict[tuple[int, ...], list[tuple[str, int, int]]] = {}
    for (name, box), ranks in holders.items():
        itemsize = _ITEMSIZE[meta[name].dtype]
        if box.numel or not math.prod(meta[name].shape):
            by_set.setdefault(tuple(ranks), []).append((name, box.numel * itemsize, itemsize))
    _check_cover(key, meta, holders)
    per_rank: dict[int, list[Piece]] = {}
    for members, sizes in sorted(by_set.items()):
        for m, pieces in zip(members, balance(split(sizes, len(members)), len(members)), strict=True):
            per_rank.setdefault(m, []).extend(pieces)
    files = [FileAssignment(f"{key}/{STATE_FILE}", "state", min(shards), None, None)]
    files += [FileAssignment(f"{key}/{shard_file(r)}", "tensors", r, None, tuple(sorted(p)))
              for r, p in sorted(per_rank.items()) if p]
    return files, {n: (m.dtype, m.shape) for n, m in sorted(meta.items())}


def shard_digest_key(key: str, name: str) -> str:
    """Where a shared shard's digest travels in a rank's replica digests (beside the components' own)."""
    return f"{key}\x00shard\x00{name}"


def check_shared_shards(decls: Sequence[Mapping[str, ComponentDecl]], summaries: Sequence[Mapping[str, str | None]]
                        ) -> None:
    """The ranks holding one shard of a SHARDED component (a Replicate() mesh dimension) must hold the same
    bytes: written once, a drifted copy would be saved half from one rank and half from another. Rank 0 runs
    this at every save (digests change every time; the plan may be reused)."""
    for key in sorted({k for per in decls for k in per}):
        holders: dict[tuple[str, Box], list[int]] = {}
        for rank, per in enumerate(decls):
            for s in (per[key].shards or ()) if key in per else ():
                if s.shared:
                    holders.setdefault((s.name, s.box), []).append(rank)
        found: dict[str, set[int]] = {}
        sets = []
        for (name, _), ranks in sorted(holders.items(), key=lambda item: (item[0][0], item[0][1].offsets)):
            digest = {r: summaries[r].get(shard_digest_key(key, name)) for r in ranks}
            bad = [r for r in ranks[1:] if digest[r] != digest[ranks[0]]]
            if bad:
                found.setdefault(name, set()).update(bad)
                sets.append(ranks)
        if found:
            shown = ", ".join(f"{n!r} (ranks {sorted(r)})" for n, r in sorted(found.items())[:10])
            raise ReplicationError(
                f"component {key!r} (SHARDED): shards that several ranks hold (a Replicate() mesh dimension) differ "
                f"between their holders {[list(s) for s in sets[:4]]}: {shown} differ from the copy on rank "
                f"{sets[0][0]}. Nothing was saved. The replicas drifted apart (a missed all-reduce over the "
                "replicated dimension, or a rank-dependent update); fix the cause",
                component=key, mismatches={n: sorted(r) for n, r in found.items()}, replica_ranks=sets[0])


def _check_cover(key: str, meta: dict[str, ShardMeta], holders: dict[tuple[str, Box], list[int]]) -> None:
    """The distinct shards of each tensor must add up to it (they come from one layout)."""
    cover: dict[str, int] = {}
    for name, box in holders:
        cover[name] = cover.get(name, 0) + box.numel
    for name, n in cover.items():
        if n != math.prod(meta[name].shape):
            raise CheckpointError(
                f"component {key!r}, tensor {name!r}: the shards the ranks hold add up to {n} elements of its "
                f"{math.prod(meta[name].shape)}; they do not come from one DeviceMesh layout")


def owner_for_load(pattern: SharingPattern, topo: RankTopology, replica_sets: Sequence[Sequence[int]],
                   process_group: str | None, key: str) -> int | None:
    """Whose copy this rank reads: its rank, its node, the index of its saved group, or None."""
    return placement_for(pattern).owner_for_load(topo, replica_sets, process_group, key)
