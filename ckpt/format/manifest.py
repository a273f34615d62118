"""checkpoint_manifest.json: what a committed checkpoint holds. Written last; its presence is the commit.

The dataclasses a manifest is made of and how they are written. The manifest carries a digest of its own
content (`manifest_xxh3_128`) so a flipped byte in it is caught like one in any other file. Reading one, with
every field checked, is manifest_read.py. See docs/format.md for the layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..patterns.kinds import SharingPattern, ValidationLevel
from .tensor_io import TensorInfo

FORMAT_VERSION = 3  # the newest version this ckpt writes
# Version 1 has no SHARDED components; a manifest without one is still written as version 1, so a ckpt that
# reads only version 1 keeps reading every checkpoint it can understand. Version 3 adds block digests to each
# piece of a SHARDED tensor; version-2 manifests (pieces without digests) still load.
FILE_KINDS = ("tensors", "state")  # safetensors, or the msgpack skeleton with every non-tensor value
DIGEST_FIELD = "manifest_xxh3_128"  # digest of the manifest's own content, every other field included



@dataclass(frozen=True)
class FileEntry:
    """One file of a component. `owner` says whose copy it is: a rank (PER_RANK), a group index
    (PER_GROUP), a node (PER_NODE), or None for the job's single copy."""

    path: str
    kind: str
    writer_rank: int
    owner: int | None
    nbytes: int
    xxh3_128: str
    tensors: tuple[TensorInfo, ...] = ()


@dataclass(frozen=True)
class SavedPiece:
    """Part of a SHARDED tensor on disk: elements [start, stop) of the box [offsets, offsets + lengths) of the
    full tensor, flattened in row-major order, stored at bytes [begin, end) of `file` (from the file's start)."""

    file: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    start: int
    stop: int
    begin: int
    end: int
    block: int = 0  # the digests below are of consecutive blocks of this many bytes (the last one shorter)
    digests: tuple[str, ...] | None = None  # xxh3-128 per block; None in a version-2 manifest


@dataclass(frozen=True)
class ShardedTensor:
    """A tensor of a SHARDED component: its full shape, dtype (safetensors code) and where its pieces are."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[SavedPiece, ...]


@dataclass(frozen=True)
class ComponentEntry:
    pattern: SharingPattern
    process_group: str | None
    required: bool
    validation_level: ValidationLevel
    replica_sets: tuple[tuple[int, ...], ...]  # groups (PER_GROUP), nodes (PER_NODE), all ranks (REPLICATED)
    files: tuple[FileEntry, ...]
    tensors: dict[str, ShardedTensor] | None = None  # SHARDED only: every tensor by name, with its pieces

    def files_for(self, owner: int | None) -> list[FileEntry]:
        return [f for f in self.files if f.owner == owner]


@dataclass(frozen=True)
class Topology:
    """The job's shape at save time."""

    world_size: int
    num_nodes: int
    local_world_size: int
    process_groups: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    step: int
    created_utc: str
    topology: Topology
    versions: dict[str, str]
    metrics: dict[str, float | str | None]
    components: dict[str, ComponentEntry]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        plain = _to_plain(self)
        plain.pop("format_version")
        sharded = [t for c in self.components.values() for t in (c.tensors or {}).values()]
        version = (3 if any(p.digests is not None for t in sharded for p in t.pieces) else 2) if sharded else 1
        plain = {"format_version": version, **plain}
        plain = {"format_version": plain["format_version"], DIGEST_FIELD: content_digest(plain), **plain}
        return _format(plain, 0) + "\n"


def content_digest(data: Mapping[str, Any]) -> str:
    """xxh3-128 of a manifest's content (its digest field left out), independent of layout and key order."""
    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, dict | list) or (isinstance(value, list) and all(
        not isinstance(v, dict | list) or (isinstance(v, list) and all(not isinstance(x, dict | list) for x in v))
        for v in value))


def _format(value: Any, depth: int) -> str:
    """JSON with one line per small object or list of numbers: readable, and small for many tensors."""
    if _is_leaf(value) or (isinstance(value, dict) and all(_is_leaf(v) for v in value.values()) and len(value) <= 4
                           and not any(isinstance(v, list) and v and isinstance(v[0], list) for v in value.values())):
        return json.dumps(value, allow_nan=False, separators=(", ", ": "))
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = ",\n".join(f"{inner}{json.dumps(k)}: {_format(v, depth + 1)}" for k, v in value.items())
        return "{\n" + items + "\n" + pad + "}"
    items = ",\n".join(f"{inner}{_format(v, depth + 1)}" for v in value)
    return "[\n" + items + "\n" + pad + "]"


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, SharingPattern | ValidationLevel):
        return obj.value
    if isinstance(obj, ComponentEntry) and obj.tensors is None:
        return {k: _to_plain(getattr(obj, k)) for k in obj.__dataclass_fields__ if k != "tensors"}
    if isinstance(obj, SavedPiece):
        plain = {"file": obj.file, "offsets": list(obj.offsets), "lengths": list(obj.lengths), "start": obj.start,
                 "stop": obj.stop, "bytes": [obj.begin, obj.end]}
        if obj.digests is not None:
            plain.update({"block_bytes": obj.block, "xxh3_128": list(obj.digests)})
        return plain
    if isinstance(obj, TensorInfo):
        plain = {"name": obj.name, "dtype": obj.dtype, "shape": list(obj.shape)}
        if obj.chunk is not None:
            plain["chunk"] = {"shape": list(obj.chunk.shape), "start": obj.chunk.start, "stop": obj.chunk.stop}
        return plain
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _to_plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | str | None]:
    """Metrics as JSON can hold them: finite numbers stay numbers, NaN/Inf become strings."""
    out: dict[str, float | str | None] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be strings, got {name!r}")
        if hasattr(value, "item"):  # tensors and NumPy scalars
            value = _single_number(name, value)
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[name] = value
        elif isinstance(value, int | float):
            out[name] = float(value) if math.isfinite(value) else str(float(value))
        else:
            raise TypeError(f"metric {name!r}={value!r}: metrics must be numbers, strings, bools or None")
    return out


def _single_number(name: str, value: Any) -> Any:
    """A one-element tensor or array as a Python number; anything larger is an error naming the metric."""
    try:
        return value.item()
    except (RuntimeError, ValueError):  # torch says RuntimeError, NumPy ValueError
        shape = list(getattr(value, "shape", ()))
        raise TypeError(f"metric {name!r} is a {type(value).__name__} of shape {shape}, not a single number; "
                        f"pass one value (e.g. metrics[{name!r}] = t.mean().item())") from None




def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-ready data."""
    return _to_plain(manifest)


__all__ = ["DIGEST_FIELD", "FORMAT_VERSION", "ComponentEntry", "FileEntry", "Manifest", "SavedPiece",
           "ShardedTensor", "Topology",
           "content_digest", "manifest_dict", "plain_metrics"]
