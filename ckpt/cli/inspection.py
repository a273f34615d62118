"""Looking inside committed checkpoints offline: what they hold, whether their bytes are intact, and how
two of them differ. Used by the `ckpt` command; everything is read through the manifest and safetensors
readers (never pickle), and reports are plain data ready for JSON.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..component import SharingPattern
from ..errors import CheckpointDeletedError, CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format.layout import MANIFEST_NAME, PARTIAL_SUFFIX, PIN_NAME, list_checkpoints, parse_step
from ..format.manifest import ComponentEntry, FileEntry, Manifest, TensorInfo
from ..format.manifest_read import read_manifest, refuse_linked_folder
from ..format.serialization import join_path, unflatten_state
from ..format.tensor_io import DTYPE_TO_ST, ST_TO_DTYPE, read_blob
from ..io.storage import Storage, is_url, norm_path, storage_for, walk_files
from ..load.full import full_tensors
from ..load.loading import check_copy, checked_path
from ..patterns.placements import placement_for
from ..patterns.sharded_read import check_sharded, damaged_pieces

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Opened:
    """A committed checkpoint opened for reading."""

    storage: Storage
    path: str
    manifest: Manifest


def open_checkpoint(path: str | os.PathLike, storage: Storage | None = None) -> Opened:
    """The checkpoint at `path` (its folder, or its manifest file), or an error saying what `path` is."""
    path = os.fspath(path)
    storage = storage_for(path, storage)
    path = norm_path(path) if is_url(path) else os.path.normpath(path)
    if os.path.basename(path) == MANIFEST_NAME:
        path = os.path.dirname(path) or "."
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist", path=path)
    if os.path.islink(path):  # a run dir's entry that leads elsewhere is refused, not read
        refuse_linked_folder(path)
    enclosing = _enclosing_checkpoint(storage, path)
    if not storage.is_dir(path) and not os.path.islink(path):
        of = f"a file of the checkpoint {enclosing}; pass {enclosing}" if enclosing else "a file, not a checkpoint folder"
        raise CheckpointNotFoundError(f"{path} is {of}", path=path)
    if not storage.exists(os.path.join(path, MANIFEST_NAME)):
        if not storage.exists(path):  # it was there a moment ago
            raise CheckpointDeletedError(f"{path} was deleted while it was being opened", path=path)
        if enclosing:
            raise CheckpointNotFoundError(f"{path} is a folder inside the checkpoint {enclosing}; pass {enclosing}",
                                          path=path)
        if path.endswith(PARTIAL_SUFFIX):
            raise CheckpointNotFoundError(f"{path} is an unfinished save (no {MANIFEST_NAME}); it cannot be read",
                                          path=path)
        refs = list_checkpoints(storage, path)
        if refs:
            raise CheckpointNotFoundError(f"{path} is a run directory, not a checkpoint; pass one of its "
                                          f"checkpoints, e.g. {refs[-1].path} (the latest)", path=path)
        raise CheckpointNotFoundError(f"{path} is not a checkpoint: it holds no {MANIFEST_NAME}", path=path)
    with deletion_noticed(storage, path, "opened"):
        return Opened(storage, path, read_manifest(storage, path))


def _enclosing_checkpoint(storage: Storage, path: str) -> str | None:
    """The committed checkpoint `path` lies inside (a component's folder or file), if any."""
    parent = os.path.dirname(path)
    for _ in range(4):  # a checkpoint's files are at most a few folders deep
        if not parent or parent == os.path.dirname(parent):
            return None
        if parse_step(os.path.basename(parent)) is not None and storage.exists(os.path.join(parent, MANIFEST_NAME)):
            return parent
        parent = os.path.dirname(parent)
    return None


@contextlib.contextmanager
def deletion_noticed(storage: Storage, path: str, doing: str) -> Iterator[None]:
    """Turn a failure caused by the checkpoint being deleted under the reader (retention, `ckpt prune`) into
    CheckpointDeletedError: its files went with its manifest, which says nothing about their content."""
    try:
        yield
    except (CheckpointError, OSError) as exc:
        if storage.exists(os.path.join(path, MANIFEST_NAME)) or isinstance(exc, CheckpointDeletedError):
            raise
        raise CheckpointDeletedError(f"{path} was deleted while it was being {doing} (by retention, `ckpt prune` "
                                     "or a person); nothing can be said about its files", path=path) from exc


def copy_label(pattern: SharingPattern, owner: int | None) -> str:
    """How a copy is named in reports: "" for the job's single copy, else "rank 3", "group 1", "node 0"."""
    return placement_for(pattern).copy_label(owner)


def dtype_name(st_dtype: str) -> str:
    """A safetensors dtype code as torch names it ("F32" -> "float32")."""
    dtype = ST_TO_DTYPE.get(st_dtype)
    return str(dtype).removeprefix("torch.") if dtype is not None else st_dtype


def owners(entry: ComponentEntry) -> list[int | None]:
    found = {f.owner for f in entry.files}
    return sorted(found, key=lambda o: -1 if o is None else o)


def read_copy(ck: Opened, key: str, owner: int | None, verify: bool = True,
              on_file: Callable[[int], Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one copy of a component, merged from its files (REPLICATED parts included).
    `on_file(nbytes)` is called after each file is read."""
    return dict(full_tensors(ck.storage, ck.path, key, ck.manifest.components[key], owner, verify, on_file=on_file))


# ---- tensors stored as raw bytes -----------------------------------------------------------------
# A dtype safetensors lacks (complex128, float8_e8m0fnu, ...) is stored as uint8[*shape, element size];
# only the copy's skeleton knows the real dtype. Unflattening the skeleton over the stored tensors (the
# loader's own code) gives each such tensor back as its real dtype, at the key path it is named by.

def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value of a rebuilt state dict that is not a dict, list or tuple, with its key path (the name
    its tensor has in the files)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from leaves(v, join_path(path, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from leaves(v, join_path(path, i))
    else:
        yield path or "(root)", value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) state dict, in state-dict order."""
    return (v for _, v in leaves(value) if isinstance(v, torch.Tensor))


def read_skeleton(ck: Opened, key: str, owner: int | None,
                  on_file: Callable[[int], Any] | None = None) -> bytes | None:
    """The msgpack skeleton of one copy (digest checked), or None when the copy has none."""
    f = state_file(ck.manifest.components[key], owner)
    if f is None:
        return None
    blob = read_blob(ck.storage, checked_path(ck.path, f, key), f.nbytes, f.xxh3_128, key)
    if on_file is not None:
        on_file(f.nbytes)
    return blob


def state_path(ck: Opened, key: str, owner: int | None) -> str | None:
    f = state_file(ck.manifest.components[key], owner)
    return None if f is None else os.path.join(ck.path, f.path)


def state_file(entry: ComponentEntry, owner: int | None) -> FileEntry | None:
    """The copy's msgpack file: the state around its tensors (None when the copy is tensors only)."""
    return next((f for f in entry.files_for(owner) if f.kind == "state"), None)


def with_real_dtypes(state: Any, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`stored` (tensors by name, as in the files) with each one kept as raw bytes replaced by its value in
    its real dtype, taken from `state`: the copy's skeleton unflattened over `stored`."""
    out = dict(stored)
    for path, value in leaves(state):
        # Only a raw-bytes reference decodes to a dtype safetensors lacks.
        if isinstance(value, torch.Tensor) and value.dtype not in DTYPE_TO_ST and path in out:
            out[path] = value
    return out


def read_real_copy(ck: Opened, key: str, owner: int | None,
                   on_file: Callable[[int], Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """One copy's tensors in their real dtypes, and its state dict rebuilt (None when it has no skeleton)."""
    tensors = read_copy(ck, key, owner, on_file=on_file)
    blob = read_skeleton(ck, key, owner, on_file)
    if blob is None:
        return tensors, None
    state = unflatten_state(blob, tensors, key, source=state_path(ck, key, owner))
    return with_real_dtypes(state, tensors), state


def _may_hold_raw(infos: list[TensorInfo]) -> bool:
    return any(t.dtype == "U8" and (t.chunk.shape if t.chunk else t.shape) for t in infos)


def _real_forms(ck: Opened, key: str, owner: int | None) -> dict[str, torch.Tensor]:
    """Meta tensors with the real dtype and shape of the copy's raw-bytes tensors, from the manifest and
    the skeleton alone. {} when there are none, or when the skeleton cannot be read (`verify` says why):
    the stored form is shown then."""
    infos = [t for f in ck.manifest.components[key].files_for(owner) if f.kind == "tensors" for t in f.tensors]
    if not _may_hold_raw(infos):
        return {}
    try:
        stored = {t.name: torch.empty(t.chunk.shape if t.chunk else t.shape, device="meta",
                                      dtype=ST_TO_DTYPE.get(t.dtype, torch.uint8)) for t in infos}
        blob = read_skeleton(ck, key, owner)
        state = None if blob is None else unflatten_state(blob, stored, key, source=state_path(ck, key, owner))
    except (CheckpointError, OSError, RuntimeError, ValueError):
        return {}
    real = with_real_dtypes(state, stored)
    return {name: t for name, t in real.items() if t is not stored[name]}


def _real_shape(t: TensorInfo, real: torch.Tensor) -> list[int] | None:
    """The shape of the stored tensor or piece `t` in its real dtype (None: a piece cut inside an element)."""
    if t.chunk is None:
        return list(real.shape)
    size = real.element_size()
    if t.chunk.start % size or t.chunk.stop % size:
        return None
    return [(t.chunk.stop - t.chunk.start) // size]


def _tensor_row(key: str, c: ComponentEntry, f: FileEntry, t: TensorInfo, real: torch.Tensor | None) -> dict:
    dtype, shape, stored_as = dtype_name(t.dtype), list(t.shape), None
    real_shape = None if real is None else _real_shape(t, real)
    if real is not None and real_shape is not None:
        stored_as = f"{dtype}{shape}"
        dtype, shape = str(real.dtype).removeprefix("torch."), real_shape
    return {"component": key, "copy": copy_label(c.pattern, f.owner), "name": t.name, "dtype": dtype,
            "shape": shape, "stored_as": stored_as, "file": f.path}


# ---- inspect -------------------------------------------------------------------------------------

def describe(ck: Opened, with_tensors: bool = False) -> dict[str, Any]:
    """What a checkpoint holds: step, time, topology, metrics, and per component its pattern, group,
    validation level, writer ranks, files, bytes and tensor count (and every tensor when asked, in its real
    dtype and shape; `stored_as` gives the stored uint8 form of one kept as raw bytes). A file that leads
    outside the checkpoint (a symlink) is refused as a load refuses it: the checkpoint does not vouch for it."""
    m = ck.manifest
    comps, tensors = [], []
    for key, c in sorted(m.components.items()):
        for f in c.files:
            checked_path(ck.path, f, key)
        comps.append({
            "key": key, "pattern": c.pattern.value, "process_group": c.process_group, "required": c.required,
            "validation_level": c.validation_level.value, "copies": len(owners(c)),
            "writer_ranks": sorted({f.writer_rank for f in c.files}), "files": len(c.files),
            "nbytes": sum(f.nbytes for f in c.files), "tensors": sum(len(f.tensors) for f in c.files)})
        if not with_tensors:
            continue
        real = {o: _real_forms(ck, key, o) for o in owners(c)}
        rows = [(-1 if f.owner is None else f.owner, t.name, f, t) for f in c.files for t in f.tensors]
        tensors += [_tensor_row(key, c, f, t, real[f.owner].get(t.name))
                    for _, _, f, t in sorted(rows, key=lambda r: r[:2])]
    topo = m.topology
    out = {
        "path": ck.path, "step": m.step, "created_utc": m.created_utc, "format_version": m.format_version,
        "pinned": ck.storage.exists(os.path.join(ck.path, PIN_NAME)), "metrics": m.metrics,
        "versions": m.versions, "nbytes": sum(c["nbytes"] for c in comps),
        "files": sum(c["files"] for c in comps),
        "topology": {"world_size": topo.world_size, "num_nodes": topo.num_nodes,
                     "local_world_size": topo.local_world_size,
                     "process_groups": {k: [list(g) for g in v] for k, v in topo.process_groups.items()}},
        "components": comps,
    }
    if with_tensors:
        out["tensor_list"] = tensors
    return out


# ---- verify --------------------------------------------------------------------------------------

def verify(ck: Opened, progress: Progress | None = None) -> dict[str, Any]:
    """Check the checkpoint as a load would before applying anything: re-hash every file the manifest lists
    (ok, missing, wrong size, wrong digest, unsafe path), then, for each copy whose bytes are intact, the
    checks of `ckpt.load.loading.check_copy` (tensor headers against the manifest, value files decoding
    within the limits). `ok` means a load will not refuse it for its content; `deleted` that the checkpoint
    was removed while it was being read (its files' state is then unknown, not bad)."""
    entries = [(key, f) for key, c in sorted(ck.manifest.components.items()) for f in c.files]
    total = sum(f.nbytes for _, f in entries)
    files, done = [], 0
    for key, f in entries:
        status, detail = _check_bytes(ck, key, f, progress, done, total)
        done += f.nbytes
        if progress:
            progress(done, total)
        files.append({"path": f.path, "component": key, "writer_rank": f.writer_rank, "nbytes": f.nbytes,
                      "status": status, "detail": detail})
    _check_contents(ck, {f["path"]: f for f in files})
    listed = {f.path for _, f in entries} | {MANIFEST_NAME, PIN_NAME}
    extra = sorted(p for p in walk_files(ck.storage, ck.path) if p not in listed)
    bad = [f for f in files if f["status"] != "ok"]
    deleted = bool(bad) and not ck.storage.exists(os.path.join(ck.path, MANIFEST_NAME))
    return {"path": ck.path, "ok": not bad, "deleted": deleted, "checked": len(files), "bad": len(bad),
            "nbytes": total, "files": files, "unlisted": extra}


def _check_bytes(ck: Opened, key: str, f: FileEntry, progress: Progress | None, done: int,
                 total: int) -> tuple[str, str]:
    """(status, detail) of one file's bytes against its manifest entry."""
    try:
        path = checked_path(ck.path, f, key)
        size = ck.storage.size(path)
        if size != f.nbytes:
            return "wrong size", f"{size} bytes, the manifest says {f.nbytes}"
        entry = ck.manifest.components[key]
        pieces = damaged_pieces(ck.storage, path, key, entry, f.path) if entry.tensors and f.kind == "tensors" else []
        if pieces:  # SHARDED: each piece checked whole too, naming the tensor a load would refuse
            return "digest mismatch", f"its bytes changed after it was written ({'; '.join(pieces[:4])})"
        if _hash_file(ck.storage, path, progress, done, total) != f.xxh3_128:
            return "digest mismatch", "its bytes changed after it was written"
    except FileNotFoundError:
        return "missing", "listed in the manifest but not on disk"
    except CorruptCheckpointError as exc:
        return "unsafe path", str(exc)
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc}"
    return "ok", ""


def _check_contents(ck: Opened, rows: dict[str, dict[str, Any]]) -> None:
    """The load's own content checks on every copy whose files all have intact bytes; a refusal marks the
    file it names (or the copy's first file) "does not load"."""
    for key, c in sorted(ck.manifest.components.items()):
        for owner in owners(c):
            copy = c.files_for(owner)
            if any(rows[f.path]["status"] != "ok" for f in copy):
                continue
            try:
                if c.tensors is not None:  # SHARDED: pieces of one tensor in every writer's file
                    check_sharded(ck.storage, ck.path, key, c)
                else:
                    check_copy(ck.storage, ck.path, key, c, owner)
            except (CheckpointError, OSError) as exc:
                named = os.path.relpath(exc.filename if isinstance(exc, OSError) and exc.filename else
                                        getattr(exc, "path", None) or ck.path, ck.path).replace(os.sep, "/")
                row = rows.get(named, rows[copy[0].path])
                row["status"], row["detail"] = "does not load", " ".join(str(exc).split())


def _hash_file(storage: Storage, path: str, progress: Progress | None, done: int, total: int) -> str:
    hasher = xxhash.xxh3_128()
    with storage.open_read(path) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return hasher.hexdigest()


# ---- diff ----------------------------------------------------------------------------------------


__all__ = ["Opened", "copy_label", "describe", "leaves", "open_checkpoint", "read_copy", "read_real_copy",
           "read_skeleton", "state_file", "verify", "with_real_dtypes"]
