"""The local work of a load: find this rank's files for a component, read and check them, rebuild state."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import CorruptCheckpointError, SerializationError
from ..format.manifest import ComponentEntry, FileEntry
from ..format.serialization import unflatten_state
from ..format.tensor_io import ST_TO_DTYPE, read_blob, read_safetensors
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
    expected = {t.name: t for t in entry.tensors}
    if set(tensors) != set(expected):
        raise CorruptCheckpointError(
            f"file {path} (component {component!r}) holds tensors {sorted(tensors)[:5]}... but the manifest lists "
            f"{sorted(expected)[:5]}...", path=path, component=component)
    for name, t in tensors.items():
        info = expected[name]
        if list(t.shape) != list(info.shape) or t.dtype != ST_TO_DTYPE[info.dtype]:
            raise CorruptCheckpointError(
                f"file {path}: tensor {name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                f"{ST_TO_DTYPE[info.dtype]} {list(info.shape)}", path=path, component=component)
    return tensors


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
    pieces: dict[str, list[tuple[int, int, str, tuple[int, ...]]]] = {}
    for f in files:
        for t in f.tensors:
            if t.chunk is not None:
                pieces.setdefault(t.name, []).append((t.chunk.start, t.chunk.stop, t.dtype, t.chunk.shape))
    whole = {}
    for name, parts in pieces.items():
        parts.sort()
        dtypes, shapes = {p[2] for p in parts}, {p[3] for p in parts}
        numel = math.prod(parts[0][3])
        ends = [0] + [p[1] for p in parts]
        if len(dtypes) != 1 or len(shapes) != 1 or [p[0] for p in parts] != ends[:-1] or ends[-1] != numel:
            raise CorruptCheckpointError(f"component {key!r}: the pieces of tensor {name!r} in {ckpt_dir} do not "
                                         "cover it exactly once; the manifest is inconsistent", path=ckpt_dir,
                                         component=key)
        dtype, shape = ST_TO_DTYPE[parts[0][2]], list(parts[0][3])
        live = (into or {}).get(name)
        fits = (live is not None and live.device.type == "cpu" and live.dtype == dtype and list(live.shape) == shape
                and live.is_contiguous() and not live.requires_grad)
        whole[name] = live if fits else torch.empty(shape, dtype=dtype)
    return whole


def read_component(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None,
                   verify: bool, into: Mapping[str, torch.Tensor] | None = None, threads: int = 1) -> Any:
    """The state dict of `key` for the copy owned by `owner`, rebuilt from its files. `into`: the
    component's live tensors by name, to read into in place."""
    files = entry.files_for(owner)
    skeletons = [f for f in files if f.kind == "state"]
    if len(skeletons) != 1:
        whose = "the job" if owner is None else f"owner {owner}"
        raise CorruptCheckpointError(f"component {key!r} in {ckpt_dir} has {len(skeletons)} state files for {whose} "
                                     "(expected 1); the manifest is inconsistent", path=ckpt_dir, component=key)
    tensors = read_copy_tensors(storage, ckpt_dir, key, entry, owner, verify, into, threads)
    s = skeletons[0]
    raw = read_blob(storage, checked_path(ckpt_dir, s, key), s.nbytes, s.xxh3_128 if verify else None, key)
    try:
        return unflatten_state(raw, tensors, key)
    except SerializationError as exc:  # bytes that match the manifest but are not a state file ckpt wrote
        raise CorruptCheckpointError(f"file {checked_path(ckpt_dir, s, key)} (component {key!r}) cannot be decoded: "
                                     f"{exc}", path=os.path.join(ckpt_dir, s.path), component=key) from exc
