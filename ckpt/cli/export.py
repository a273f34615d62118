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
A tensor whose dtype safetensors lacks is written in a lossless form it has, recorded per tensor in the
file's metadata under `ckpt.encoded_dtypes`: complex128 and complex32 as their real and imaginary parts
(float64 / float16 with a trailing dimension of 2, as `torch.view_as_real` gives them), every other such
dtype as its raw bytes (uint8 with a trailing dimension of the element size).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import torch

from ..component import SharingPattern
from ..errors import CheckpointError
from ..format.manifest import ComponentEntry
from ..format.tensor_io import DTYPE_TO_ST, write_safetensors
from ..io.storage import LocalStorage
from .inspection import Opened, Progress, copy_label, leaves, owners, read_real_copy

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


def _non_tensor_paths(state: Any) -> list[str]:
    return [] if state is None else [p for p, v in leaves(state) if not isinstance(v, torch.Tensor)]


def _encoded(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """`tensors` with each dtype safetensors lacks in its lossless stand-in, and what was done to each."""
    out, notes = {}, {}
    for name, t in tensors.items():
        if t.dtype in DTYPE_TO_ST:
            out[name] = t
            continue
        real = str(t.dtype).removeprefix("torch.")
        if t.is_complex():  # complex128 -> float64[..., 2], complex32 -> float16[..., 2]
            out[name], notes[name] = torch.view_as_real(t.resolve_conj()), {"dtype": real, "encoding": "real_imag"}
        else:
            out[name], notes[name] = t.contiguous().unsqueeze(-1).view(torch.uint8), {"dtype": real,
                                                                                      "encoding": "raw_bytes"}
    return out, notes


def export_component(ck: Opened, key: str, output: str, *, rank: int | None = None, group: int | None = None,
                     node: int | None = None, concat_dim: int | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Write component `key` of checkpoint `ck` to `output` (a safetensors file, replaced atomically)."""
    entry = ck.manifest.components.get(key)
    if entry is None:
        raise CheckpointError(f"{ck.path} has no component {key!r}; it has {sorted(ck.manifest.components)}")
    chosen = select_copies(entry, key, rank, group, node, concat_dim)
    if not any(f.tensors for o in chosen for f in entry.files_for(o)):
        raise CheckpointError(f"component {key!r} of {ck.path} holds no tensors (only plain values, which "
                              "safetensors cannot hold); nothing was written. Read it with `ckpt inspect` instead")
    labels = [copy_label(entry.pattern, o) or "the single copy" for o in chosen]
    # What is read: every chosen copy's files (its skeleton says which tensors are raw bytes, and what is left out).
    total = sum(f.nbytes for o in chosen for f in entry.files_for(o))
    done = [0]

    def on_file(nbytes: int) -> None:
        done[0] += nbytes
        if progress:
            progress(done[0], total)

    read = [read_real_copy(ck, key, owner, on_file=on_file) for owner in chosen]
    copies = [tensors for tensors, _ in read]
    tensors = _concat(copies, labels, concat_dim, key) if concat_dim is not None else copies[0]
    tensors, encoded = _encoded(tensors)
    left_out = _non_tensor_paths(read[0][1])
    how = f"concatenated along dim {concat_dim}: {', '.join(labels)}" if concat_dim is not None else labels[0]
    metadata = {"format": "pt", "ckpt.source": ck.path, "ckpt.component": key, "ckpt.step": str(ck.manifest.step),
                "ckpt.pattern": entry.pattern.value, "ckpt.copy": how}
    if encoded:
        metadata["ckpt.encoded_dtypes"] = json.dumps(encoded, sort_keys=True)
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
            "tensors": len(tensors), "nbytes": written.nbytes, "left_out_non_tensor": left_out,
            "encoded_dtypes": encoded}


def has_tensors(entry: ComponentEntry) -> bool:
    return any(f.tensors for f in entry.files)


def export_all(ck: Opened, output_dir: str, progress: Progress | None = None) -> dict[str, Any]:
    """Every component that holds tensors, into `output_dir`: `<key>.safetensors` for a component with one copy,
    `<key>/<copy>.safetensors` (`rank-3`, `group-1`, `node-0`) for one with a copy per rank, group or node.
    Components without tensors are listed as left out. Returns what was written."""
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"-o {output_dir} is a file; without --component, -o names a folder to write every "
                              "component into (or pass --component KEY to write one file)")
    written: list[dict[str, Any]] = []
    skipped = [key for key, entry in sorted(ck.manifest.components.items()) if not has_tensors(entry)]
    fresh = not os.path.exists(output_dir)
    try:
        for key, entry in sorted(ck.manifest.components.items()):
            for path, pick in ([] if key in skipped else _copy_targets(key, entry, output_dir)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                written.append(export_component(ck, key, path, progress=progress, **pick))
    except BaseException:  # a refused component (damaged, undecodable): leave no half export behind
        if fresh:
            shutil.rmtree(output_dir, ignore_errors=True)
        else:
            for one in written:
                with contextlib.suppress(OSError):
                    os.remove(one["output"])
        raise
    if not written:
        raise CheckpointError(f"{ck.path} has no component with tensors (components: {sorted(ck.manifest.components)});"
                              " nothing was written")
    return {"output": output_dir, "step": ck.manifest.step, "files": written, "left_out_components": skipped}


def _copy_targets(key: str, entry: ComponentEntry, output_dir: str) -> list[tuple[str, dict[str, int | None]]]:
    """(file, select_copies argument) of each copy of a component: `<key>.safetensors` for a single copy, else
    `<key>/<copy>.safetensors` per rank, group or node."""
    copies = owners(entry)
    if len(copies) == 1:
        return [(os.path.join(output_dir, f"{key}.safetensors"), {})]
    return [(os.path.join(output_dir, key, copy_label(entry.pattern, o).replace(" ", "-") + ".safetensors"),
             _selection(entry, o)) for o in copies]


def _selection(entry: ComponentEntry, owner: int | None) -> dict[str, int | None]:
    """The select_copies argument naming copy `owner`."""
    if entry.pattern is SharingPattern.PER_GROUP:
        return {"group": owner}
    if entry.pattern is SharingPattern.PER_NODE:
        return {"node": owner}
    return {"rank": owner}


__all__ = ["export_all", "export_component", "has_tensors", "select_copies"]
