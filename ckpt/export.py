"""Export one component of a checkpoint as a single safetensors file any safetensors reader can open.

Which copy is exported:
- GLOBAL and REPLICATED components have one copy for the job; REPLICATED parts written by several ranks
  are merged back into one file.
- PER_RANK, PER_GROUP and PER_NODE components have one copy per rank, group or node. Choose one with
  `rank` (the copy that rank loads; works for every pattern), `group` (PER_GROUP) or `node` (PER_NODE),
  or pass `concat_dim` to concatenate every copy's tensors along that dimension, in copy order
  (rank 0, 1, ...). Without a choice, a component with a single copy exports that copy.
Tensors keep their key paths as names (a model's `0.weight` stays `0.weight`; nested state is joined with
`/`). Non-tensor values (ints, strings, ...) cannot go into safetensors and are listed as left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .component import SharingPattern
from .errors import CheckpointError
from .inspection import Opened, Progress, copy_label, owners, read_copy
from .loading import checked_path
from .manifest import ComponentEntry, FileEntry
from .serialization import join_path, unflatten_state
from .storage import LocalStorage
from .tensor_io import read_blob, write_safetensors

_SINGLE = (SharingPattern.GLOBAL, SharingPattern.REPLICATED)


def _owner_of_rank(entry: ComponentEntry, rank: int) -> int | None:
    if entry.pattern in _SINGLE:
        return None
    if entry.pattern is SharingPattern.PER_RANK:
        return rank
    for index, members in enumerate(entry.replica_sets):
        if rank in members:
            return index
    raise CheckpointError(f"rank {rank} is in none of the saved {entry.pattern.name} copies "
                          f"{[list(m) for m in entry.replica_sets]}")


def select_copies(entry: ComponentEntry, key: str, rank: int | None = None, group: int | None = None,
                  node: int | None = None, concat_dim: int | None = None) -> list[int | None]:
    """The copies (owners) to export, following the rules in this module's docstring."""
    chosen = [name for name, v in (("--rank", rank), ("--group", group), ("--node", node),
                                   ("--concat-dim", concat_dim)) if v is not None]
    if len(chosen) > 1:
        raise CheckpointError(f"pass one of {', '.join(chosen)}, not several")
    have = owners(entry)
    labels = ", ".join(copy_label(entry.pattern, o) for o in have)
    if (group is not None and entry.pattern is not SharingPattern.PER_GROUP) or (
            node is not None and entry.pattern is not SharingPattern.PER_NODE):
        raise CheckpointError(f"{chosen[0]} does not apply: component {key!r} is {entry.pattern.name}; use "
                              + ("--rank R or --concat-dim D" if len(have) > 1 else "no selection (it has one copy)"))
    if concat_dim is not None:
        if entry.pattern in _SINGLE:
            raise CheckpointError(f"component {key!r} is {entry.pattern.name}: it has one copy, nothing to "
                                  "concatenate; leave out --concat-dim")
        return have
    if rank is not None or group is not None or node is not None:
        owner = _owner_of_rank(entry, rank) if rank is not None else group if group is not None else node
        if owner not in have:
            raise CheckpointError(f"component {key!r} has no copy for {chosen[0]} {rank if rank is not None else owner}"
                                  f"; its copies: {labels}")
        return [owner]
    if len(have) == 1:
        return have
    hint = {SharingPattern.PER_GROUP: "--group G or ", SharingPattern.PER_NODE: "--node N or "}.get(entry.pattern, "")
    raise CheckpointError(f"component {key!r} is {entry.pattern.name} with {len(have)} copies ({labels}); pick one "
                          f"with {hint}--rank R (the copy rank R loads), or join them with --concat-dim D")


def _concat(copies: list[dict[str, torch.Tensor]], labels: list[str], dim: int, key: str) -> dict[str, torch.Tensor]:
    names = list(copies[0])
    for c, label in zip(copies[1:], labels[1:], strict=True):
        if set(c) != set(names):
            raise CheckpointError(f"component {key!r}: {label} holds tensors {sorted(set(c) ^ set(names))[:5]} "
                                  f"that {labels[0]} does not (or the reverse); copies with different tensors "
                                  "cannot be concatenated; export one copy with --rank")
    out = {}
    for name in names:
        parts = [c[name] for c in copies]
        if parts[0].dim() == 0 or not -parts[0].dim() <= dim < parts[0].dim():
            raise CheckpointError(f"component {key!r}: tensor {name!r} has shape {list(parts[0].shape)}, which has no "
                                  f"dimension {dim} to concatenate along; export one copy with --rank")
        try:
            out[name] = torch.cat(parts, dim=dim)
        except RuntimeError as exc:
            shapes = [f"{label}: {str(p.dtype).removeprefix('torch.')}{list(p.shape)}"
                      for label, p in zip(labels, parts, strict=True)]
            raise CheckpointError(f"component {key!r}: tensor {name!r} cannot be concatenated along dimension {dim} "
                                  f"({'; '.join(shapes)}): {str(exc).splitlines()[0]}") from None
    return out


def _non_tensor_paths(value: Any, path: str = "") -> list[str]:
    if isinstance(value, torch.Tensor):
        return []
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _non_tensor_paths(v, join_path(path, k))]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _non_tensor_paths(v, join_path(path, i))]
    return [path or "(root)"]


def _skeleton(entry: ComponentEntry, owner: int | None) -> FileEntry | None:
    """The copy's msgpack file: the state around its tensors (None when the copy is tensors only)."""
    return next((f for f in entry.files_for(owner) if f.kind == "state"), None)


def _left_out(ck: Opened, key: str, owner: int | None, tensors: dict[str, torch.Tensor],
              on_file: Callable[[int], None]) -> list[str]:
    s = _skeleton(ck.manifest.components[key], owner)
    if s is None:
        return []
    raw = read_blob(ck.storage, checked_path(ck.path, s, key), s.nbytes, s.xxh3_128, key)
    on_file(s.nbytes)
    return _non_tensor_paths(unflatten_state(raw, tensors, key))


def export_component(ck: Opened, key: str, output: str, *, rank: int | None = None, group: int | None = None,
                     node: int | None = None, concat_dim: int | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Write component `key` of checkpoint `ck` to `output` (a safetensors file, replaced atomically)."""
    entry = ck.manifest.components.get(key)
    if entry is None:
        raise CheckpointError(f"{ck.path} has no component {key!r}; it has {sorted(ck.manifest.components)}")
    chosen = select_copies(entry, key, rank, group, node, concat_dim)
    labels = [copy_label(entry.pattern, o) or "the single copy" for o in chosen]
    # What is read: every chosen copy's tensor files, and the first copy's state file (for what is left out).
    skeleton = _skeleton(entry, chosen[0])
    total = sum(f.nbytes for o in chosen for f in entry.files_for(o) if f.kind != "state")
    total += skeleton.nbytes if skeleton else 0
    done = [0]

    def on_file(nbytes: int) -> None:
        done[0] += nbytes
        if progress:
            progress(done[0], total)

    copies = [read_copy(ck, key, owner, on_file=on_file) for owner in chosen]
    tensors = _concat(copies, labels, concat_dim, key) if concat_dim is not None else copies[0]
    left_out = _left_out(ck, key, chosen[0], copies[0], on_file)
    how = f"concatenated along dim {concat_dim}: {', '.join(labels)}" if concat_dim is not None else labels[0]
    metadata = {"format": "pt", "ckpt.source": ck.path, "ckpt.component": key, "ckpt.step": str(ck.manifest.step),
                "ckpt.pattern": entry.pattern.value, "ckpt.copy": how}
    output = os.fspath(output)
    if os.path.isdir(output):
        raise CheckpointError(f"-o {output} is a folder; give a file name such as {os.path.join(output, key)}.safetensors")
    tmp = output + ".tmp"
    storage = LocalStorage()
    try:
        written = write_safetensors(storage, tmp, list(tensors.items()), metadata)
        storage.rename(tmp, output)
    finally:
        storage.remove_file(tmp)
    return {"output": output, "component": key, "pattern": entry.pattern.value, "copy": how, "step": ck.manifest.step,
            "tensors": len(tensors), "nbytes": written.nbytes, "left_out_non_tensor": left_out}


__all__ = ["export_component", "select_copies"]
