"""The local work of a load: find this rank's files for a component, read and check them, rebuild state."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..format.manifest import ComponentEntry, FileEntry
from ..format.serialization import unflatten_state
from ..format.tensor_io import ST_TO_DTYPE, read_blob, read_header, read_safetensors, verify_tensor_file
from ..io.storage import Storage, is_inside
from ..io.threads import parallel_map


def checked_path(ckpt_dir: str, entry: FileEntry, component: str) -> str:
    """The file's path, refusing anything (a symlink, say) that leads outside the checkpoint."""
    path = os.path.join(ckpt_dir, entry.path)
    if not is_inside(ckpt_dir, path):
        raise CorruptCheckpointError(f"file {path} (component {component!r}) leads outside the checkpoint "
                                     f"{ckpt_dir}; refusing to read it", path=path, component=component)
    return path


def read_tensors(storage: Storage, ckpt_dir: str, entry: FileEntry, component: str, verify: bool,
                 into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One safetensors file, checked against its manifest entry (digest, names, dtypes, shapes).
    `into`: existing tensors to read matching entries into, in place."""
    path = checked_path(ckpt_dir, entry, component)
    tensors = read_safetensors(storage, path, entry.nbytes, entry.xxh3_128 if verify else None, component, into)
    check_file_tensors(path, component, entry, {n: (t.dtype, list(t.shape)) for n, t in tensors.items()})
    return tensors


def check_file_tensors(path: str, component: str, entry: FileEntry,
                       found: Mapping[str, tuple[torch.dtype, list[int]]]) -> None:
    """Refuse a tensor file whose tensors (name -> dtype, shape) are not the ones its manifest entry lists."""
    expected = {t.name: t for t in entry.tensors}
    if set(found) != set(expected):
        raise CorruptCheckpointError(
            f"file {path} (component {component!r}) holds tensors {sorted(found)[:5]}... but the manifest lists "
            f"{sorted(expected)[:5]}...", path=path, component=component)
    for name, (dtype, shape) in found.items():
        info = expected[name]
        if list(shape) != list(info.shape) or dtype != ST_TO_DTYPE[info.dtype]:
            raise CorruptCheckpointError(
                f"file {path}: tensor {name!r} is {dtype} {list(shape)}, the manifest says "
                f"{ST_TO_DTYPE[info.dtype]} {list(info.shape)}", path=path, component=component)


def check_copy(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None) -> None:
    """Everything a load checks about one copy's files apart from their digests, without reading tensor data:
    each tensor file's header against the manifest (names, dtypes, shapes, byte ranges), pieces that cover
    their tensors exactly once, one state file, and that state file decoding (within the limits) over the
    tensors the manifest lists. Raises CorruptCheckpointError naming the file."""
    verify_copy(storage, ckpt_dir, key, entry, owner, verify=False)


class DeferredRead:
    """Staged state whose bytes the read phase checked but did not put in place: `read(into)` puts them there
    (into the live tensors `into`, by name, where they fit) and returns the state, once every rank agreed
    to apply."""

    def read(self, into: Mapping[str, torch.Tensor] | None) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class VerifiedCopy(DeferredRead):
    """One copy of a component whose files passed every check a load makes (sizes, digests, headers against
    the manifest, the state file's decoding), with its tensors not read yet. `read` reads them once every rank
    agreed to apply, straight into the live tensors that match (so a load costs one pass over the bytes into
    place, not a fresh copy and then another). The bytes are not hashed a second time: each file's identity
    (inode, size, times) must still be the one it had when it was checked, or the read is refused."""

    storage: Storage
    ckpt_dir: str
    key: str
    entry: ComponentEntry
    owner: int | None
    state_bytes: bytes
    state_path: str
    identities: tuple[tuple[str, tuple[int, ...]], ...]
    threads: int

    def read(self, into: Mapping[str, torch.Tensor] | None) -> Any:
        for path, identity in self.identities:
            if self.storage.identity(path) != identity:
                raise CorruptCheckpointError(
                    f"file {path} (component {self.key!r}) was replaced or rewritten after this load checked it; "
                    "nothing of it was read. Load again", path=path, component=self.key)
        tensors = read_copy_tensors(self.storage, self.ckpt_dir, self.key, self.entry, self.owner, False, into,
                                    self.threads)
        return unflatten_state(self.state_bytes, tensors, self.key, source=self.state_path)


def _identity(identify: Callable[[str], tuple[int, ...]] | None, path: str) -> tuple[int, ...] | None:
    if identify is None:
        return None
    try:
        return tuple(identify(path))
    except OSError:  # reported by the check itself, naming the file
        return None


def verify_copy(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None,
                verify: bool = True, threads: int = 1) -> VerifiedCopy:
    """Check one copy's files as a load does (with `verify`, each tensor file's digest too, streamed on
    `threads` threads through small buffers) without keeping any tensor bytes. Raises CorruptCheckpointError
    naming the file."""
    files = [f for f in entry.files_for(owner) if f.kind == "tensors"]
    stored = {name: torch.empty(shape, dtype=dtype, device="meta")
              for name, (dtype, shape) in _piece_layout(files, key, ckpt_dir).items()}

    identify = getattr(storage, "identity", None)
    identities: list[tuple[str, tuple[int, ...]]] = []

    def check(f: FileEntry) -> dict[str, tuple[torch.dtype, list[int]]]:
        path = checked_path(ckpt_dir, f, key)
        before = _identity(identify, path)
        found = (verify_tensor_file(storage, path, f.nbytes, f.xxh3_128, key) if verify and f.xxh3_128
                 else read_header(storage, path, f.nbytes, key))
        check_file_tensors(path, key, f, found)
        if identify is not None:
            after = _identity(identify, path)
            if after is None or after != before:
                raise CorruptCheckpointError(f"file {path} (component {key!r}) changed while this load checked it; "
                                             "load again", path=path, component=key)
            identities.append((path, after))
        return found

    seen: set[str] = set()
    for f, found in zip(files, parallel_map(check, files, threads, "ckpt-verify"), strict=True):
        whole = {t.name for t in f.tensors if t.chunk is None}
        if whole & seen:
            raise CorruptCheckpointError(f"component {key!r}: tensors {sorted(whole & seen)[:5]} appear in two files",
                                         path=os.path.join(ckpt_dir, f.path), component=key)
        seen |= whole
        stored.update({n: torch.empty(found[n][1], dtype=found[n][0], device="meta") for n in whole})
    s = state_file(entry, owner, key, ckpt_dir)
    path = checked_path(ckpt_dir, s, key)
    raw = read_blob(storage, path, s.nbytes, s.xxh3_128 if verify else None, key)
    unflatten_state(raw, stored, key, source=path)  # CorruptCheckpointError for anything ckpt did not write
    return VerifiedCopy(storage, ckpt_dir, key, entry, owner, raw, path, tuple(identities), threads)


def state_file(entry: ComponentEntry, owner: int | None, key: str, ckpt_dir: str) -> FileEntry:
    """The copy's one state file (msgpack skeleton); CorruptCheckpointError when the manifest lists another
    number."""
    skeletons = [f for f in entry.files_for(owner) if f.kind == "state"]
    if len(skeletons) != 1:
        whose = "the job" if owner is None else f"owner {owner}"
        raise CorruptCheckpointError(f"component {key!r} in {ckpt_dir} has {len(skeletons)} state files for {whose} "
                                     "(expected 1); the manifest is inconsistent", path=ckpt_dir, component=key)
    return skeletons[0]


def read_copy_tensors(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None,
                      verify: bool, into: Mapping[str, torch.Tensor] | None = None, threads: int = 1,
                      on_file: Callable[[int], Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one copy of a component, from all its files (read `threads` at a time).

    Pieces of a tensor that was split across writers are read straight into their slices of one full
    tensor (the caller's own, from `into`, when it matches), so reassembly costs no copy.
    """
    files = [f for f in entry.files_for(owner) if f.kind == "tensors"]
    whole = _assemble_chunked(files, key, ckpt_dir, into)
    per_file = []
    for f in files:
        targets = {n: t for n, t in (into or {}).items() if n not in whole}
        for t in f.tensors:
            if t.chunk is not None:
                targets[t.name] = whole[t.name].view(-1)[t.chunk.start: t.chunk.stop]
        per_file.append((f, targets))

    def read_one(item: tuple[FileEntry, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        f, targets = item
        part = read_tensors(storage, ckpt_dir, f, key, verify, targets)
        if on_file is not None:
            on_file(f.nbytes)
        return part

    parts = parallel_map(read_one, per_file, threads, "ckpt-read")
    tensors: dict[str, torch.Tensor] = {}
    for (f, targets), part in zip(per_file, parts, strict=True):
        for t in f.tensors:
            if t.chunk is not None and part[t.name].data_ptr() != targets[t.name].data_ptr():
                targets[t.name].copy_(part[t.name])  # a piece whose view could not take the bytes directly
        clash = (tensors.keys() & part.keys()) - whole.keys()
        if clash:
            raise CorruptCheckpointError(f"component {key!r}: tensors {sorted(clash)[:5]} appear in two files",
                                         path=os.path.join(ckpt_dir, f.path), component=key)
        tensors.update({n: t for n, t in part.items() if n not in whole})
    tensors.update(whole)
    return tensors


def _assemble_chunked(files: list[FileEntry], key: str, ckpt_dir: str,
                      into: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A full tensor for each tensor stored in pieces, after checking the pieces cover it exactly."""
    whole = {}
    for name, (dtype, shape) in _piece_layout(files, key, ckpt_dir).items():
        live = (into or {}).get(name)
        fits = (live is not None and live.device.type == "cpu" and live.dtype == dtype and list(live.shape) == shape
                and live.is_contiguous() and not live.requires_grad)
        whole[name] = live if fits else torch.empty(shape, dtype=dtype)
    return whole


def _piece_layout(files: list[FileEntry], key: str, ckpt_dir: str) -> dict[str, tuple[torch.dtype, list[int]]]:
    """(dtype, full shape) of each tensor stored in pieces, after checking the pieces cover it exactly once."""
    pieces: dict[str, list[tuple[int, int, str, tuple[int, ...]]]] = {}
    for f in files:
        for t in f.tensors:
            if t.chunk is not None:
                pieces.setdefault(t.name, []).append((t.chunk.start, t.chunk.stop, t.dtype, t.chunk.shape))
    layout = {}
    for name, parts in pieces.items():
        parts.sort()
        dtypes, shapes = {p[2] for p in parts}, {p[3] for p in parts}
        numel = math.prod(parts[0][3])
        ends = [0] + [p[1] for p in parts]
        if len(dtypes) != 1 or len(shapes) != 1 or [p[0] for p in parts] != ends[:-1] or ends[-1] != numel:
            raise CorruptCheckpointError(f"component {key!r}: the pieces of tensor {name!r} in {ckpt_dir} do not "
                                         "cover it exactly once; the manifest is inconsistent", path=ckpt_dir,
                                         component=key)
        layout[name] = (ST_TO_DTYPE[parts[0][2]], list(parts[0][3]))
    return layout


def read_component(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None,
                   verify: bool, into: Mapping[str, torch.Tensor] | None = None, threads: int = 1) -> Any:
    """The state dict of `key` for the copy owned by `owner`, rebuilt from its files. `into`: the
    component's live tensors by name, to read into in place."""
    s = state_file(entry, owner, key, ckpt_dir)
    tensors = read_copy_tensors(storage, ckpt_dir, key, entry, owner, verify, into, threads)
    path = checked_path(ckpt_dir, s, key)
    raw = read_blob(storage, path, s.nbytes, s.xxh3_128 if verify else None, key)
    return unflatten_state(raw, tensors, key, source=path)  # CorruptCheckpointError for anything ckpt did not write
