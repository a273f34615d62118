"""The local work of a save: take each component's state, write this rank's files, commit (rank 0)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import __version__
from .component import SharingPattern, StateComponent, ValidationLevel
from .errors import CheckpointError
from .layout import MANIFEST_NAME
from .manifest import ComponentEntry, FileEntry, Manifest, plain_metrics
from .planning import ComponentDecl, ComponentPlan, FileAssignment
from .serialization import FlatState, flatten_state
from .staging import StagingPool
from .storage import Storage
from .tensor_io import TensorInfo, WrittenFile, write_blob, write_safetensors
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
        sizes = tuple((name, t.numel() * t.element_size()) for name, t in snap.flat.tensors.items())
    c = snap.component
    decl = ComponentDecl(c.key, snap.pattern.value, c.process_group_name, c.required, snap.validation.value, sizes,
                         digest)
    return PreparedComponent(decl, snap.flat, table)


def write_files(storage: Storage, root: str, assignments: Sequence[FileAssignment],
                prepared: Mapping[str, PreparedComponent], rank: int) -> list[dict]:
    """Write this rank's files under `root` and fsync them and their folders. Returns file records."""
    records = []
    folders = set()
    for a in assignments:
        key = a.relpath.split("/", 1)[0]
        flat = prepared[key].flat
        path = os.path.join(root, a.relpath)
        folders.add(os.path.dirname(path))
        storage.makedirs(os.path.dirname(path))
        if a.kind == "state":
            written = write_blob(storage, path, flat.skeleton)
        else:
            names = list(flat.tensors) if a.tensor_names is None else list(a.tensor_names)
            if not names:
                continue
            missing = [n for n in names if n not in flat.tensors]
            if missing:
                raise CheckpointError(f"component {key!r}: rank {rank} was assigned tensors {missing[:5]} that its "
                                      "state does not have; the replicas do not hold the same tensors")
            try:
                written = write_safetensors(storage, path, [(n, flat.tensors[n]) for n in names])
            except TypeError as exc:
                raise CheckpointError(f"component {key!r}: {exc}") from exc
        records.append(_record(a, written))
    for folder in sorted(folders):
        storage.fsync_dir(folder)
    return records


def _record(a: FileAssignment, w: WrittenFile) -> dict:
    return {"path": a.relpath, "kind": a.kind, "writer_rank": a.writer, "owner": a.owner, "nbytes": w.nbytes,
            "xxh3_128": w.digest, "tensors": [[t.name, t.dtype, list(t.shape)] for t in w.tensors]}


def build_manifest(step: int, plans: Mapping[str, ComponentPlan], records: Sequence[Sequence[dict]],
                   topology, metrics: Mapping | None) -> Manifest:
    by_key: dict[str, list[FileEntry]] = {k: [] for k in plans}
    for per_rank in records:
        for r in per_rank:
            entry = FileEntry(path=r["path"], kind=r["kind"], writer_rank=r["writer_rank"], owner=r["owner"],
                              nbytes=r["nbytes"], xxh3_128=r["xxh3_128"],
                              tensors=tuple(TensorInfo(n, d, tuple(s)) for n, d, s in r["tensors"]))
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
        # Moved aside under a name that is never loaded; a crash here leaves the old copy recoverable.
        replaced = final + ".replaced.partial"
        storage.remove_tree(replaced)
        storage.rename(final, replaced)
    storage.rename(partial, final)
    storage.fsync_dir(parent)
    if replaced:
        storage.remove_tree(replaced)
