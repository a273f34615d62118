"""The local work of a save: take each component's state, write this rank's files, commit (rank 0)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from ..component import SharingPattern, StateComponent, ValidationLevel
from ..errors import CheckpointError
from ..format.decoding import unflatten_state
from ..format.digests import BlockDigests
from ..format.layout import MANIFEST_NAME, REPLACED_SUFFIX, parse_step
from ..format.manifest import ComponentEntry, FileEntry, Manifest, SavedPiece, ShardedTensor, plain_metrics
from ..format.serialization import FlatState, flatten_state
from ..format.tensor_io import ChunkInfo, TensorInfo, WrittenFile, write_blob, write_safetensors
from ..io.staging import StagingPool
from ..io.storage import Storage
from ..io.threads import parallel_map
from ..patterns.base import tensor_layout_for
from ..patterns.sharded import ShardMeta, refuse_dtensors, replicated_view, with_digests
from .planning import MIN_CHUNK_BYTES, ComponentDecl, ComponentPlan, FileAssignment, Piece, balance
from .validation import summary_digest


@dataclass(frozen=True)
class Snapshot:
    """One component's state on this rank at save time, taken apart (and staged, for async saves)."""

    component: StateComponent
    pattern: SharingPattern
    validation: ValidationLevel
    flat: FlatState
    shards: dict[str, ShardMeta] | None = None  # SHARDED: what this rank holds of each tensor
    compared: bool = True  # False in a job of one rank: no replicas, so no digests are taken to compare

    @property
    def replicated(self) -> FlatState:
        """What the replicas of this component hold alike, and the replica check compares."""
        return self.flat if self.shards is None else replicated_view(self.flat, self.shards)


@dataclass(frozen=True)
class PreparedComponent:
    """A snapshot with its digests and declaration, ready to plan and write."""

    decl: ComponentDecl
    flat: FlatState
    table: dict[str, str] | None
    shards: dict[str, ShardMeta] | None = None
    replicated: FlatState | None = None  # what the replica check compares (`flat` unless SHARDED)


def snapshot(component: StateComponent, staging: StagingPool, host_too: bool = True, alone: bool = False
             ) -> Snapshot:
    """Take a component's state now. Its device tensors (and with `host_too` its host tensors) are copied into
    the pool's reusable buffers, so training may change the live state while the copies are written.
    `alone`: this is a job of one rank, so there are no replicas to compare (no replica digests; the manifest
    still records the component's validation level)."""
    pattern = component.resolve_pattern()
    try:
        state = component.state_dict()
    except Exception as exc:
        raise CheckpointError(f"component {component.key!r}: state_dict() raised {type(exc).__name__}: {exc}") from exc
    flat = flatten_state(state, component.key)
    shards = None
    placement = tensor_layout_for(pattern)
    if placement is not None:
        flat, shards = placement.take(flat, component.key)
    else:
        refuse_dtensors(flat, component.key, pattern.name)
    flat = staging.stage(component.key, flat, host_too=host_too)
    return Snapshot(component, pattern, component.resolve_validation(pattern), flat, shards, compared=not alone)


def hand_over_staged(snapshots: Mapping[str, Snapshot], staging: StagingPool
                     ) -> tuple[dict[str, Any], Callable[[], None]] | None:
    """The state an async save staged, rebuilt per component key as a load would give it, with the pool's
    buffers handed to the caller (who must only read them), and a function that gives them back to the pool
    for the next saves once the caller is done. None when the save staged no whole-state copy (a SHARDED
    component is staged as this rank's shards)."""
    if not snapshots or any(s.shards is not None or tensor_layout_for(s.pattern) is not None
                            for s in snapshots.values()):
        return None
    states = {key: unflatten_state(s.flat.skeleton, s.flat.tensors, key) for key, s in snapshots.items()}
    for key, s in snapshots.items():
        staging.detach(key, s.flat.tensors)
    flats = {key: dict(s.flat.tensors) for key, s in snapshots.items()}

    def give_back() -> None:
        for key, tensors in flats.items():
            staging.adopt(key, tensors)
        flats.clear()

    return states, give_back


def declare(snap: Snapshot, is_planner: bool, threads: int = 1) -> PreparedComponent:
    """Digest a snapshot (on `threads` threads) for the replication check. `is_planner`: this rank plans its
    replica set's split."""
    level = snap.validation if snap.compared else ValidationLevel.NONE
    digest, table = summary_digest(snap.replicated, level, threads)
    sizes = None
    if is_planner:
        sizes = tuple((name, t.numel() * t.element_size(), t.element_size()) for name, t in snap.flat.tensors.items())
    c = snap.component
    metas = snap.shards
    if metas is not None and level is not ValidationLevel.NONE:
        metas = with_digests(snap.flat, metas)
    shards = None if metas is None else tuple(metas.values())
    decl = ComponentDecl(c.key, snap.pattern.value, c.process_group_name, c.required, snap.validation.value, sizes,
                         digest, shards)
    return PreparedComponent(decl, snap.flat, table, snap.shards, snap.replicated)


# A writer's tensors for one component are spread over several files of at least this size (so from twice
# it), up to one file per I/O thread, so the writer's threads write them (and a load reads them) in parallel.
MIN_SPLIT_FILE_BYTES = 64 << 20


@dataclass(frozen=True)
class _FileJob:
    """One file to write: a planned assignment, or one of the files a large tensors assignment became."""

    assignment: FileAssignment
    relpath: str
    entries: tuple[tuple[str, torch.Tensor], ...] = ()
    chunks: Mapping[str, ChunkInfo] | None = None


def write_files(storage: Storage, root: str, assignments: Sequence[FileAssignment],
                prepared: Mapping[str, PreparedComponent], rank: int, threads: int = 1,
                on_file: Callable[[str], None] | None = None) -> list[dict]:
    """Write this rank's files under `root` (`threads` at a time), fsync them and their folders.
    `on_file(relpath)` is called as each file starts. Returns one record per file written."""
    for folder in sorted({os.path.dirname(os.path.join(root, a.relpath)) for a in assignments}):
        storage.makedirs(folder)
    jobs = [job for a in assignments for job in _jobs(a, prepared, rank, threads)]

    def write_one(job: _FileJob) -> dict:
        if on_file is not None:
            on_file(job.relpath)
        path = os.path.join(root, job.relpath)
        if job.assignment.kind == "state":
            key = job.relpath.split("/", 1)[0]
            return _record(job, write_blob(storage, path, prepared[key].flat.skeleton))
        shards = prepared[job.relpath.split("/", 1)[0]].shards
        try:
            return _record(job, write_safetensors(storage, path, job.entries, chunks=job.chunks,
                                                  block_digests=shards is not None), shards)
        except TypeError as exc:
            raise CheckpointError(f"component {job.relpath.split('/', 1)[0]!r}: {exc}") from exc

    records = parallel_map(write_one, jobs, threads, "ckpt-write")
    for folder in sorted({os.path.dirname(os.path.join(root, a.relpath)) for a in assignments}):
        storage.fsync_dir(folder)
    return records


def _jobs(a: FileAssignment, prepared: Mapping[str, PreparedComponent], rank: int, threads: int) -> list[_FileJob]:
    """The files one assignment becomes: itself, nothing (no tensors), or several for a large one."""
    if a.kind == "state":
        return [_FileJob(a, a.relpath)]
    key = a.relpath.split("/", 1)[0]
    tensors = prepared[key].flat.tensors
    pieces = [Piece(n) for n in tensors] if a.pieces is None else list(a.pieces)
    if not pieces:
        return []
    missing = sorted({p.name for p in pieces if p.name not in tensors})
    if missing:
        raise CheckpointError(f"component {key!r}: rank {rank} was assigned tensors {missing[:5]} that its "
                              "state does not have; the replicas do not hold the same tensors")
    sized = [(p, _piece_bytes(p, tensors[p.name])) for p in pieces]
    count = min(threads, sum(n for _, n in sized) // MIN_SPLIT_FILE_BYTES)  # files of MIN_SPLIT_FILE_BYTES or more
    if count <= 1:
        return [_FileJob(a, a.relpath, *_cut(pieces, tensors))]
    stem, ext = a.relpath.rsplit(".", 1)
    groups = [g for g in balance(_recut(sized, tensors, count), count) if g]
    return [_FileJob(a, f"{stem}.file-{i}-of-{len(groups)}.{ext}", *_cut(group, tensors))
            for i, group in enumerate(groups, start=1)]


def _piece_bytes(p: Piece, tensor: torch.Tensor) -> int:
    stop = tensor.numel() if p.stop is None else p.stop
    return (stop - (p.start or 0)) * tensor.element_size()


def _recut(sized: Sequence[tuple[Piece, int]], tensors: Mapping[str, torch.Tensor], count: int
           ) -> list[tuple[Piece, int]]:
    """Pieces cut further so `count` files can hold about the same bytes (at most `count` cuts of one)."""
    share = max(-(-sum(n for _, n in sized) // count), MIN_CHUNK_BYTES)
    out: list[tuple[Piece, int]] = []
    for p, nbytes in sized:
        tensor = tensors[p.name]
        itemsize = tensor.element_size()
        # A strided tensor would be copied once per cut (reshape); it stays whole.
        if nbytes <= share or nbytes < 2 * MIN_CHUNK_BYTES or itemsize == 0 or not tensor.is_contiguous():
            out.append((p, nbytes))
            continue
        start = p.start or 0
        stop = tensor.numel() if p.stop is None else p.stop
        per = -(-(stop - start) // min(count, -(-nbytes // share)))
        out += [(Piece(p.name, s, min(s + per, stop)), (min(s + per, stop) - s) * itemsize)
                for s in range(start, stop, per)]
    return out


def _cut(pieces: Sequence[Piece], tensors: Mapping[str, torch.Tensor]
         ) -> tuple[tuple[tuple[str, torch.Tensor], ...], dict[str, ChunkInfo]]:
    """The (name, tensor) entries of a file: whole tensors, or 1-D views of a range of a flattened one."""
    entries, chunks = [], {}
    for p in pieces:
        tensor = tensors[p.name]
        if p.start is None:
            entries.append((p.name, tensor))
            continue
        stop = p.stop if p.stop is not None else tensor.numel()
        entries.append((p.name, tensor.detach().reshape(-1)[p.start: stop]))
        chunks[p.name] = ChunkInfo(tuple(tensor.shape), p.start, stop)
    return tuple(entries), chunks


def _record(job: _FileJob, w: WrittenFile, shards: Mapping[str, ShardMeta] | None = None) -> dict:
    def plain(t: TensorInfo) -> list:
        chunk = None if t.chunk is None else [list(t.chunk.shape), t.chunk.start, t.chunk.stop]
        return [t.name, t.dtype, list(t.shape), chunk]

    a = job.assignment
    record = {"path": job.relpath, "kind": a.kind, "writer_rank": a.writer, "owner": a.owner, "nbytes": w.nbytes,
              "xxh3_128": w.digest, "tensors": [plain(t) for t in w.tensors]}
    if shards is not None:  # SHARDED: where each piece sits in its full tensor, and in this file, and its digests
        record["pieces"] = [_piece(t, span, shards[t.name], b)
                            for t, span, b in zip(w.tensors, w.spans, w.blocks, strict=True)]
    return record


def _piece(t: TensorInfo, span: tuple[int, int], meta: ShardMeta, blocks: BlockDigests) -> list:
    start, stop = (0, meta.box.numel) if t.chunk is None else (t.chunk.start, t.chunk.stop)
    return [t.name, list(meta.box.offsets), list(meta.box.lengths), start, stop, span[0], span[1], blocks.block,
            list(blocks.digests)]


def build_manifest(step: int, plans: Mapping[str, ComponentPlan], records: Sequence[Sequence[dict]],
                   topology, metrics: Mapping | None) -> Manifest:
    by_key: dict[str, list[FileEntry]] = {k: [] for k in plans}
    for per_rank in records:
        for r in per_rank:
            entry = FileEntry(path=r["path"], kind=r["kind"], writer_rank=r["writer_rank"], owner=r["owner"],
                              nbytes=r["nbytes"], xxh3_128=r["xxh3_128"],
                              tensors=tuple(TensorInfo(n, d, tuple(s), None if c is None else ChunkInfo(tuple(c[0]), c[1], c[2]))
                                            for n, d, s, c in r["tensors"]))
            by_key[r["path"].split("/", 1)[0]].append(entry)
    pieces: dict[str, dict[str, list[SavedPiece]]] = {}
    for per_rank in records:
        for r in per_rank:
            for name, offsets, lengths, start, stop, begin, end, block, digests in r.get("pieces", ()):
                pieces.setdefault(r["path"].split("/", 1)[0], {}).setdefault(name, []).append(
                    SavedPiece(r["path"], tuple(offsets), tuple(lengths), start, stop, begin, end, block,
                               tuple(digests)))

    def sharded(key: str, p: ComponentPlan) -> dict[str, ShardedTensor] | None:
        if p.sharded is None:
            return None
        found = pieces.get(key, {})
        return {n: ShardedTensor(dtype, shape, tuple(sorted(found.get(n, []), key=lambda s: (s.offsets, s.start))))
                for n, (dtype, shape) in p.sharded.items()}

    components = {
        key: ComponentEntry(pattern=p.pattern, process_group=p.process_group, required=p.required,
                            validation_level=p.validation, replica_sets=p.replica_sets,
                            files=tuple(sorted(by_key[key], key=lambda f: f.path)), tensors=sharded(key, p))
        for key, p in sorted(plans.items())
    }
    return Manifest(
        step=step,
        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        topology=topology,
        versions={"ckpt": __version__, "torch": torch.__version__, "python": platform.python_version()},
        metrics=plain_metrics(metrics),
        components=components,
    )


def commit(storage: Storage, partial: str, final: str, manifest: Manifest, overwrite: bool) -> None:
    """Write the manifest (temp + fsync + rename), then move the folder into place and fsync the parent.
    On a store without rename, create the manifest in place, only if no writer has created it first."""
    if not storage.renames:
        _commit_in_place(storage, final, manifest)
        return
    tmp = os.path.join(partial, MANIFEST_NAME + ".tmp")
    storage.write_file(tmp, [manifest.to_json().encode()])
    storage.rename(tmp, os.path.join(partial, MANIFEST_NAME))
    storage.fsync_dir(partial)
    parent = os.path.dirname(final) or "."
    replaced = None
    if storage.exists(final):
        if not overwrite:
            raise CheckpointError(f"{final} appeared during the save; not replacing it", path=final)
        # Moved aside under a name that is never loaded, then removed once the new copy is in place. After a
        # crash between the two renames, the next coordinator of the run dir puts it back (restore_replaced).
        replaced = final + REPLACED_SUFFIX
        storage.remove_tree(replaced)
        storage.rename(final, replaced)
    storage.rename(partial, final)
    storage.fsync_dir(parent)
    if replaced:
        storage.remove_tree(replaced)


def _commit_in_place(storage: Storage, final: str, manifest: Manifest) -> None:
    try:
        storage.write_new(os.path.join(final, MANIFEST_NAME), manifest.to_json().encode())
    except FileExistsError:
        raise CheckpointError(f"{final} was committed by another writer during this save (its manifest appeared); "
                              "this save is not committed. Make sure one job saves to this run dir",
                              path=final) from None


def restore_replaced(storage: Storage, run_dir: str) -> list[str]:
    """Put back committed checkpoints an overwrite moved aside and then died before renaming the new copy
    into place, so a crash there leaves the old copy committed instead of neither. Run by the run dir's owner
    before it cleans up unfinished saves. Returns the checkpoints restored."""
    restored = []
    for name in storage.list_dir(run_dir):
        final = os.path.join(run_dir, name.removesuffix(REPLACED_SUFFIX))
        aside = os.path.join(run_dir, name)
        if (name.endswith(REPLACED_SUFFIX) and parse_step(os.path.basename(final)) is not None
                and not storage.exists(final) and storage.exists(os.path.join(aside, MANIFEST_NAME))):
            storage.rename(aside, final)
            storage.fsync_dir(run_dir)
            restored.append(final)
    return restored
