"""The local work of a load: find this rank's files for a component, read and check them, rebuild state."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CorruptCheckpointError
from .manifest import ComponentEntry, FileEntry
from .serialization import unflatten_state
from .storage import Storage
from .tensor_io import read_blob, read_safetensors


def checked_path(ckpt_dir: str, entry: FileEntry, component: str) -> str:
    """The file's path, refusing anything (a symlink, say) that leads outside the checkpoint."""
    path = os.path.join(ckpt_dir, entry.path)
    real_root = os.path.realpath(ckpt_dir)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
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
        if list(t.shape) != list(info.shape):
            raise CorruptCheckpointError(f"file {path}: tensor {name!r} has shape {list(t.shape)}, the manifest says "
                                         f"{list(info.shape)}", path=path, component=component)
    return tensors


def read_component(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None,
                   verify: bool, into: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The state dict of `key` for the copy owned by `owner`, rebuilt from its files. `into`: the
    component's live tensors by name, to read into in place."""
    files = entry.files_for(owner)
    skeletons = [f for f in files if f.kind == "state"]
    if len(skeletons) != 1:
        whose = "the job" if owner is None else f"owner {owner}"
        raise CorruptCheckpointError(f"component {key!r} in {ckpt_dir} has {len(skeletons)} state files for {whose} "
                                     "(expected 1); the manifest is inconsistent", path=ckpt_dir, component=key)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.kind == "tensors":
            part = read_tensors(storage, ckpt_dir, f, key, verify, into)
            clash = tensors.keys() & part.keys()
            if clash:
                raise CorruptCheckpointError(f"component {key!r}: tensors {sorted(clash)[:5]} appear in two files",
                                             path=os.path.join(ckpt_dir, f.path), component=key)
            tensors.update(part)
    s = skeletons[0]
    raw = read_blob(storage, checked_path(ckpt_dir, s, key), s.nbytes, s.xxh3_128 if verify else None, key)
    return unflatten_state(raw, tensors, key)
