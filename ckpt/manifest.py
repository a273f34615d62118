"""checkpoint_manifest.json: what a committed checkpoint holds. Written last; its presence is the commit.

Everything read from a manifest is checked before it is used: types, relative paths that stay inside
the checkpoint, and known enum values. See docs/format.md for the layout with an example.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .component import SharingPattern, ValidationLevel
from .errors import ManifestError
from .layout import MANIFEST_NAME
from .storage import Storage
from .tensor_io import ST_TO_DTYPE, ChunkInfo, TensorInfo

FORMAT_VERSION = 1
FILE_KINDS = ("tensors", "state")  # safetensors, or the msgpack skeleton with every non-tensor value


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
class ComponentEntry:
    pattern: SharingPattern
    process_group: str | None
    required: bool
    validation_level: ValidationLevel
    replica_sets: tuple[tuple[int, ...], ...]  # groups (PER_GROUP), nodes (PER_NODE), all ranks (REPLICATED)
    files: tuple[FileEntry, ...]

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
        plain = {"format_version": plain.pop("format_version"), **plain}
        return _format(plain, 0) + "\n"


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
            value = value.item()
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[name] = value
        elif isinstance(value, int | float):
            out[name] = float(value) if math.isfinite(value) else str(float(value))
        else:
            raise TypeError(f"metric {name!r}={value!r}: metrics must be numbers, strings, bools or None")
    return out


def read_manifest(storage: Storage, checkpoint_dir: str) -> Manifest:
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    try:
        with storage.open_read(path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{checkpoint_dir} has no {MANIFEST_NAME}: it is not a committed checkpoint",
                            path=path) from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})", path=path) from None
    return parse_manifest(data, path)


def parse_manifest(data: Any, path: str) -> Manifest:
    """Check and convert a manifest's JSON. Raises ManifestError naming the field that is wrong."""
    p = _Parser(path)
    d = p.obj(data, "manifest")
    version = p.get(d, "format_version", int, "manifest")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version} is not supported (this ckpt reads version "
                            f"{FORMAT_VERSION}); use the ckpt release that wrote it", path=path)
    topo = p.obj(p.get(d, "topology", dict, "manifest"), "topology")
    groups = {
        name: tuple(tuple(p.ints(m, f"topology.process_groups.{name}")) for m in p.list(members, f"topology.process_groups.{name}"))
        for name, members in p.obj(p.get(topo, "process_groups", dict, "topology"), "topology.process_groups").items()
    }
    topology = Topology(
        world_size=p.get(topo, "world_size", int, "topology"),
        num_nodes=p.get(topo, "num_nodes", int, "topology"),
        local_world_size=p.get(topo, "local_world_size", int, "topology"),
        process_groups=groups,
    )
    comps = p.obj(p.get(d, "components", dict, "manifest"), "components")
    return Manifest(
        step=p.get(d, "step", int, "manifest"),
        created_utc=p.get(d, "created_utc", str, "manifest"),
        topology=topology,
        versions={str(k): str(v) for k, v in p.obj(p.get(d, "versions", dict, "manifest"), "versions").items()},
        metrics=dict(p.obj(p.get(d, "metrics", dict, "manifest"), "metrics")),
        components={key: p.component(key, value) for key, value in comps.items()},
        format_version=version,
    )


class _Parser:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, why: str) -> ManifestError:
        return ManifestError(f"{self.path}: {where} {why}; the manifest is damaged or was not written by ckpt",
                             path=self.path)

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "is not an object")
        return value

    def list(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(where, "is not a list")
        return value

    def ints(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise self.fail(where, f"is not a list of non-negative integers: {value!r}")
        return value

    def get(self, d: dict, key: str, typ: type, where: str) -> Any:
        if key not in d:
            raise self.fail(f"{where}.{key}", "is missing")
        value = d[key]
        if (typ is int and type(value) is not int) or (typ is not int and not isinstance(value, typ)):
            raise self.fail(f"{where}.{key}", f"should be {typ.__name__}, is {type(value).__name__}")
        return value

    def enum(self, cls: type, value: Any, where: str) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise self.fail(where, f"has unknown value {value!r}") from None

    def component(self, key: str, value: Any) -> ComponentEntry:
        where = f"components.{key}"
        c = self.obj(value, where)
        group = c.get("process_group")
        if group is not None and not isinstance(group, str):
            raise self.fail(f"{where}.process_group", "should be a string or null")
        return ComponentEntry(
            pattern=self.enum(SharingPattern, self.get(c, "pattern", str, where), f"{where}.pattern"),
            process_group=group,
            required=self.get(c, "required", bool, where),
            validation_level=self.enum(ValidationLevel, self.get(c, "validation_level", str, where),
                                       f"{where}.validation_level"),
            replica_sets=tuple(tuple(self.ints(m, f"{where}.replica_sets"))
                               for m in self.list(self.get(c, "replica_sets", list, where), f"{where}.replica_sets")),
            files=tuple(self.file(key, i, f) for i, f in enumerate(self.get(c, "files", list, where))),
        )

    def chunk(self, value: Any, shape: tuple[int, ...], where: str) -> ChunkInfo | None:
        if value is None:
            return None
        c = self.obj(value, where)
        full = tuple(self.ints(c.get("shape"), f"{where}.shape"))
        start, stop = self.get(c, "start", int, where), self.get(c, "stop", int, where)
        if not (0 <= start <= stop <= math.prod(full)) or list(shape) != [stop - start]:
            raise self.fail(where, f"range {start}..{stop} does not fit shape {list(full)} and piece {list(shape)}")
        return ChunkInfo(full, start, stop)

    def file(self, key: str, index: int, value: Any) -> FileEntry:
        where = f"components.{key}.files[{index}]"
        f = self.obj(value, where)
        path = self.get(f, "path", str, where)
        norm = posixpath.normpath(path)
        if path.startswith("/") or "\\" in path or norm.startswith("..") or norm != path or not path:
            raise self.fail(f"{where}.path", f"{path!r} is not a plain relative path inside the checkpoint")
        kind = self.get(f, "kind", str, where)
        if kind not in FILE_KINDS:
            raise self.fail(f"{where}.kind", f"is {kind!r}, expected one of {FILE_KINDS}")
        owner = f.get("owner")
        if owner is not None and type(owner) is not int:
            raise self.fail(f"{where}.owner", "should be an integer or null")
        tensors = []
        for j, t in enumerate(self.list(f.get("tensors", []), f"{where}.tensors")):
            t = self.obj(t, f"{where}.tensors[{j}]")
            dtype = self.get(t, "dtype", str, f"{where}.tensors[{j}]")
            if dtype not in ST_TO_DTYPE:
                raise self.fail(f"{where}.tensors[{j}].dtype", f"is unknown: {dtype!r}")
            shape = tuple(self.ints(t.get("shape"), f"{where}.tensors[{j}].shape"))
            tensors.append(TensorInfo(self.get(t, "name", str, f"{where}.tensors[{j}]"), dtype, shape,
                                      self.chunk(t.get("chunk"), shape, f"{where}.tensors[{j}].chunk")))
        nbytes = self.get(f, "nbytes", int, where)
        if nbytes < 0:
            raise self.fail(f"{where}.nbytes", "is negative")
        return FileEntry(path=path, kind=kind, writer_rank=self.get(f, "writer_rank", int, where), owner=owner,
                         nbytes=nbytes, xxh3_128=self.get(f, "xxh3_128", str, where), tensors=tuple(tensors))


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-ready data."""
    return _to_plain(manifest)


__all__ = ["FORMAT_VERSION", "ComponentEntry", "FileEntry", "Manifest", "Topology", "manifest_dict",
           "parse_manifest", "plain_metrics", "read_manifest"]
