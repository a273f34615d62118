"""The local work of a save: take each component's state, write this rank's files, commit (rank 0)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import __version__
from .component import SharingPattern, StateComponent, ValidationLevel
from .errors import CheckpointError
from .layout import MANIFEST_NAME
from .manifest import ComponentEntry, FileEntry, Manifest, plain_metrics
from .planning import ComponentDecl, ComponentPlan, FileAssignment, Piece
from .serialization import FlatState, flatten_state
from .staging import StagingPool
from .storage import Storage
from .tensor_io import ChunkInfo, TensorInfo, WrittenFile, write_blob, write_safetensors
from .threads import parallel_map
from .validation import summary_digest


@dataclass(frozen=True)
class Snapshot:
    """One component's state on this rank at save time, taken apart (and staged, for async saves)."""

    component: StateComponent
    pattern: SharingPattern
    validation: ValidationLevel
    flat: FlatState


@dataclass(frozen=True)
class PreparedComponent:
    """A snapshot with its digests and declaration, ready to plan and write."""

    decl: ComponentDecl
    flat: FlatState
    table: dict[str, str] | None


def snapshot(component: StateComponent, staging: StagingPool | None) -> Snapshot:
    """Take a component's state now. With `staging`, its tensors are copied into reusable buffers, so
    training may change the live state while the copies are written."""
    pattern = component.resolve_pattern()
    try:
        state = component.stateful.state_dict()
    except Exception as exc:
        raise CheckpointError(f"component {component.key!r}: state_dict() raised {type(exc).__name__}: {exc}") from exc
    flat = flatten_state(state, component.key)
    if staging is not None:
        flat = staging.stage(component.key, flat)
    return Snapshot(component, pattern, component.resolve_validation(pattern), flat)


def declare(snap: Snapshot, is_planner: bool) -> PreparedComponent:
    """Digest a snapshot for the replication check. `is_planner`: this rank plans its replica set's split."""
    digest, table = summary_digest(snap.flat, snap.validation)
    sizes = None
    if is_planner:
        sizes = tuple((name, t.numel() * t.element_size(), t.element_size()) for name, t in snap.flat.tensors.items())
    c = snap.component
    decl = ComponentDecl(c.key, snap.pattern.value, c.process_group_name, c.required, snap.validation.value, sizes,
                         digest)
    return PreparedComponent(decl, snap.flat, table)


def write_files(storage: Storage, root: str, assignments: Sequence[FileAssignment],
                prepared: Mapping[str, PreparedComponent], rank: int, threads: int = 1,
                on_file: Callable[[str], None] | None = None) -> list[dict]:
    """Write this rank's files under `root` (`threads` at a time), fsync them and their folders.
    `on_file(relpath)` is called as each file starts. Returns one record per file written."""
    for folder in sorted({os.path.dirname(os.path.join(root, a.relpath)) for a in assignments}):
        storage.makedirs(folder)

    def write_one(a: FileAssignment) -> dict | None:
        if on_file is not None:
            on_file(a.relpath)
        key = a.relpath.split("/", 1)[0]
        flat = prepared[key].flat
        path = os.path.join(root, a.relpath)
        if a.kind == "state":
            return _record(a, write_blob(storage, path, flat.skeleton))
        pieces = [Piece(n) for n in flat.tensors] if a.pieces is None else list(a.pieces)
        if not pieces:
            return None
        missing = sorted({p.name for p in pieces if p.name not in flat.tensors})
        if missing:
            raise CheckpointError(f"component {key!r}: rank {rank} was assigned tensors {missing[:5]} that its "
                                  "state does not have; the replicas do not hold the same tensors")
        entries, chunks = _cut(pieces, flat.tensors)
        try:
            return _record(a, write_safetensors(storage, path, entries, chunks=chunks))
        except TypeError as exc:
            raise CheckpointError(f"component {key!r}: {exc}") from exc

    records = parallel_map(write_one, list(assignments), threads, "ckpt-write")
    for folder in sorted({os.path.dirname(os.path.join(root, a.relpath)) for a in assignments}):
        storage.fsync_dir(folder)
    return [r for r in records if r is not None]


def _cut(pieces: Sequence[Piece], tensors: Mapping[str, torch.Tensor]
         ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, ChunkInfo]]:
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
    return entries, chunks


def _record(a: FileAssignment, w: WrittenFile) -> dict:
    def plain(t: TensorInfo) -> list:
        chunk = None if t.chunk is None else [list(t.chunk.shape), t.chunk.start, t.chunk.stop]
        return [t.name, t.dtype, list(t.shape), chunk]

    return {"path": a.relpath, "kind": a.kind, "writer_rank": a.writer, "owner": a.owner, "nbytes": w.nbytes,
            "xxh3_128": w.digest, "tensors": [plain(t) for t in w.tensors]}


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
    components = {
        key: ComponentEntry(pattern=p.pattern, process_group=p.process_group, required=p.required,
                            validation_level=p.validation, replica_sets=p.replica_sets,
                            files=tuple(sorted(by_key[key], key=lambda f: f.path)))
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
    """Write the manifest (temp + fsync + rename), then move the folder into place and fsync the parent."""
    tmp = os.path.join(partial, MANIFEST_NAME + ".tmp")
    storage.write_file(tmp, [manifest.to_json().encode()])
    storage.rename(tmp, os.path.join(partial, MANIFEST_NAME))
    storage.fsync_dir(partial)
    parent = os.path.dirname(final) or "."
    replaced = None
    if storage.exists(final):
        if not overwrite:
            raise CheckpointError(f"{final} appeared during the save; not replacing it", path=final)
        # Moved aside under a name that is never loaded, then removed once the new copy is in place. A crash
        # between the two renames leaves the old copy on disk under that name until the next save cleans up.
        replaced = final + ".replaced.partial"
        storage.remove_tree(replaced)
        storage.rename(final, replaced)
    storage.rename(partial, final)
    storage.fsync_dir(parent)
    if replaced:
        storage.remove_tree(replaced)
