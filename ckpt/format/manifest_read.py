"""Reading checkpoint_manifest.json: every field checked before it is used.

Types, relative paths that stay inside the checkpoint, known enum values and ranks inside the saved world are
checked here. Fields this version does not know are refused rather than ignored: a reader that skips a field
it does not understand could load a checkpoint whose meaning it has not grasped. The manifest's own digest
(`manifest_xxh3_128`) is checked last, so a field error names the field. The dataclasses it returns live in
manifest.py.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ManifestError
from ..io.storage import Storage, is_inside, is_url, resolved, storage_for
from ..patterns.kinds import SharingPattern, ValidationLevel
from .layout import MANIFEST_NAME, parse_step
from .manifest import (
    DIGEST_FIELD,
    FILE_KINDS,
    FORMAT_VERSION,
    ComponentEntry,
    FileEntry,
    Manifest,
    SavedPiece,
    ShardedTensor,
    Topology,
    content_digest,
)
from .tensor_io import ST_TO_DTYPE, ChunkInfo, TensorInfo

READABLE_VERSIONS = (1, 2, 3)

# The fields of each object in a version-1 manifest (required unless listed as optional below).
_FIELDS = {
    "manifest": {"format_version", DIGEST_FIELD, "step", "created_utc", "topology", "versions", "metrics",
                 "components"},
    "topology": {"world_size", "num_nodes", "local_world_size", "process_groups"},
    "component": {"pattern", "process_group", "required", "validation_level", "replica_sets", "files", "tensors"},
    "file": {"path", "kind", "writer_rank", "owner", "nbytes", "xxh3_128", "tensors"},
    "tensor": {"name", "dtype", "shape", "chunk"},
    "chunk": {"shape", "start", "stop"},
    "sharded_tensor": {"dtype", "shape", "pieces"},
    "piece": {"file", "offsets", "lengths", "start", "stop", "bytes", "block_bytes", "xxh3_128"},
}
_OPTIONAL = {DIGEST_FIELD, "process_group", "owner", "tensors", "chunk"}
_V2_ONLY = {"tensors"}  # component fields version 1 does not have
_V3_ONLY = {"block_bytes", "xxh3_128"}  # piece fields version 2 does not have
_HEX128 = re.compile(r"^[0-9a-f]{32}$")


def read_manifest(storage: Storage | str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> Manifest:
    """A checkpoint's manifest, checked: `read_manifest(path)` on the local filesystem, or
    `read_manifest(storage, path)` through a given Storage."""
    if checkpoint_dir is None:
        checkpoint_dir = os.fspath(storage)  # type: ignore[arg-type]
        storage = storage_for(checkpoint_dir)
    checkpoint_dir = os.fspath(checkpoint_dir)
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    refuse_linked_folder(checkpoint_dir)
    _refuse_outside(checkpoint_dir, path)
    try:
        with storage.open_read(path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{checkpoint_dir} has no {MANIFEST_NAME}: it is not a committed checkpoint",
                            path=path) from None
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON ({exc})", path=path) from None
    manifest = parse_manifest(data, path)
    named = parse_step(os.path.basename(os.path.normpath(checkpoint_dir)))
    if named is not None and named != manifest.step:
        raise ManifestError(f"{path} says step {manifest.step} but its folder is named for step {named}: the manifest "
                            "was edited or the folder renamed, so which step it holds cannot be trusted; restore it "
                            "from a copy, or load another checkpoint", path=path)
    return manifest


def refuse_linked_folder(checkpoint_dir: str) -> None:
    """Refuse a checkpoint folder that is a symlink (or reached through one) leading outside the folder that
    lists it (its run dir): a run dir vouches only for what it holds, and a load must not read elsewhere."""
    if is_url(checkpoint_dir):  # object storage has no symlinks
        return
    parent = os.path.realpath(os.path.dirname(os.path.abspath(checkpoint_dir)))
    real = os.path.realpath(checkpoint_dir)
    if os.path.commonpath([parent, real]) != parent or real == parent:
        raise ManifestError(f"{checkpoint_dir} is a symlink to {real}, outside its run dir {parent}; refusing to read "
                            "it. Copy that checkpoint into the run dir, or pass its real path", path=checkpoint_dir)


def _refuse_outside(checkpoint_dir: str, path: str) -> None:
    """Refuse a manifest that resolves outside its checkpoint (a symlink, say), as data files are refused:
    its bytes would describe, and vouch for, a checkpoint it is not part of."""
    if not is_inside(checkpoint_dir, path):
        raise ManifestError(f"{path} leads outside the checkpoint {checkpoint_dir} (a symlink to "
                            f"{resolved(path)}); refusing to read it", path=path)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (ckpt writes non-finite metrics as strings)")


def parse_manifest(data: Any, path: str) -> Manifest:
    """Check and convert a manifest's JSON. Raises ManifestError naming the field that is wrong."""
    p = _Parser(path)
    d = p.obj(data, "manifest")
    version = p.get(d, "format_version", int, "manifest")
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"{path}: format_version {version} is not supported (this ckpt reads versions "
                            f"{list(READABLE_VERSIONS)}); use the ckpt release that wrote it", path=path)
    p.version = version
    p.fields(d, "manifest", "manifest")
    topology = p.topology(p.get(d, "topology", dict, "manifest"))
    p.world_size = topology.world_size
    comps = p.obj(p.get(d, "components", dict, "manifest"), "components")
    step = p.get(d, "step", int, "manifest")
    if step < 0:
        raise p.fail("manifest.step", f"is negative: {step}")
    metrics = p.obj(p.get(d, "metrics", dict, "manifest"), "metrics")
    for name, value in metrics.items():
        if value is not None and not isinstance(value, bool | int | float | str):
            raise p.fail(f"metrics.{name}", f"should be a number, string, bool or null, is {type(value).__name__}")
    versions = p.obj(p.get(d, "versions", dict, "manifest"), "versions")
    for name, value in versions.items():
        if not isinstance(value, str):
            raise p.fail(f"versions.{name}", f"should be a string, is {type(value).__name__}")
    manifest = Manifest(
        step=step,
        created_utc=p.get(d, "created_utc", str, "manifest"),
        topology=topology,
        versions=dict(versions),
        metrics=dict(metrics),
        components={key: p.component(key, value) for key, value in comps.items()},
        format_version=version,
    )
    p.unique_paths(manifest)
    if DIGEST_FIELD in d and d[DIGEST_FIELD] != _digest_or_fail(p, d):  # last: field errors say more
        raise ManifestError(f"{path} does not match its own digest ({DIGEST_FIELD}): its bytes changed after it "
                            "was written; restore it from a copy, or load another checkpoint", path=path)
    return manifest


def _digest_or_fail(p: _Parser, d: dict) -> str:
    try:
        return content_digest(d)
    except (TypeError, ValueError) as exc:  # values JSON cannot hold (only reachable with hand-built data)
        raise p.fail("manifest", f"holds values JSON cannot represent ({exc})") from None


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.world_size = 0  # known once the topology is read; ranks are checked against it
        self.version = FORMAT_VERSION

    def fields(self, d: dict, kind: str, where: str) -> None:
        """Refuse fields this version does not know, and name the first required one that is missing."""
        allowed = _FIELDS[kind] - (_V2_ONLY if kind == "component" and self.version < 2 else set()) - (
            _V3_ONLY if kind == "piece" and self.version < 3 else set())
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise self.fail(where, f"has unknown fields {unknown} (format_version {self.version} has "
                                   f"{sorted(allowed)})")
        for name in sorted(allowed - _OPTIONAL):
            if name not in d:
                raise self.fail(f"{where}.{name}", "is missing")

    def rank(self, value: Any, where: str) -> int:
        if type(value) is not int or not 0 <= value < self.world_size:
            raise self.fail(where, f"is {value!r}, not a rank of the saved world (0..{self.world_size - 1})")
        return value

    def topology(self, value: Any) -> Topology:
        topo = self.obj(value, "topology")
        self.fields(topo, "topology", "topology")
        sizes = {k: self.get(topo, k, int, "topology") for k in ("world_size", "num_nodes", "local_world_size")}
        if min(sizes.values()) < 1 or sizes["world_size"] != sizes["num_nodes"] * sizes["local_world_size"]:
            raise self.fail("topology", f"is inconsistent: {sizes} (world_size must be num_nodes x "
                                        "local_world_size, all positive)")
        self.world_size = sizes["world_size"]
        groups = {}
        for name, members in self.obj(self.get(topo, "process_groups", dict, "topology"),
                                      "topology.process_groups").items():
            where = f"topology.process_groups.{name}"
            groups[name] = tuple(tuple(self.rank(r, where) for r in self.ints(m, where))
                                 for m in self.list(members, where))
        return Topology(sizes["world_size"], sizes["num_nodes"], sizes["local_world_size"], groups)

    def unique_paths(self, manifest: Manifest) -> None:
        seen: set[str] = set()
        for key, c in manifest.components.items():
            for f in c.files:
                if f.path in seen:
                    raise self.fail(f"components.{key}.files", f"list {f.path!r} twice")
                seen.add(f.path)

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
        if not key or "/" in key or "\\" in key or key in {".", ".."}:
            raise self.fail(where, "is not a usable component name (it becomes the component's folder)")
        self.fields(c, "component", where)
        group = c.get("process_group")
        if group is not None and not isinstance(group, str):
            raise self.fail(f"{where}.process_group", "should be a string or null")
        pattern = self.enum(SharingPattern, self.get(c, "pattern", str, where), f"{where}.pattern")
        files = tuple(self.file(key, i, f) for i, f in enumerate(self.get(c, "files", list, where)))
        if (pattern is SharingPattern.SHARDED) != ("tensors" in c):
            raise self.fail(f"{where}.tensors", "is present without pattern sharded, or missing with it")
        tensors = None
        if "tensors" in c:
            sizes = {f.path: f.nbytes for f in files if f.kind == "tensors"}
            tensors = {name: self.sharded(value, sizes, f"{where}.tensors.{name}")
                       for name, value in self.obj(c["tensors"], f"{where}.tensors").items()}
        return ComponentEntry(
            pattern=pattern,
            process_group=group,
            required=self.get(c, "required", bool, where),
            validation_level=self.enum(ValidationLevel, self.get(c, "validation_level", str, where),
                                       f"{where}.validation_level"),
            replica_sets=tuple(tuple(self.rank(r, f"{where}.replica_sets") for r in self.ints(m, f"{where}.replica_sets"))
                               for m in self.list(self.get(c, "replica_sets", list, where), f"{where}.replica_sets")),
            files=files,
            tensors=tensors,
        )

    def sharded(self, value: Any, sizes: Mapping[str, int], where: str) -> ShardedTensor:
        t = self.obj(value, where)
        self.fields(t, "sharded_tensor", where)
        dtype = self.get(t, "dtype", str, where)
        if dtype not in ST_TO_DTYPE:
            raise self.fail(f"{where}.dtype", f"is unknown: {dtype!r}")
        shape = tuple(self.ints(t.get("shape"), f"{where}.shape"))
        itemsize = ST_TO_DTYPE[dtype].itemsize
        pieces = tuple(self.piece(p, shape, itemsize, sizes, f"{where}.pieces[{i}]")
                       for i, p in enumerate(self.list(t.get("pieces"), f"{where}.pieces")))
        return ShardedTensor(dtype, shape, pieces)

    def piece(self, value: Any, shape: tuple[int, ...], itemsize: int, sizes: Mapping[str, int],
              where: str) -> SavedPiece:
        p = self.obj(value, where)
        self.fields(p, "piece", where)
        file = self.get(p, "file", str, where)
        if file not in sizes:
            raise self.fail(f"{where}.file", f"{file!r} is not one of the component's tensor files")
        offsets, lengths = tuple(self.ints(p.get("offsets"), f"{where}.offsets")), tuple(
            self.ints(p.get("lengths"), f"{where}.lengths"))
        if not len(offsets) == len(lengths) == len(shape) or any(
                o + n > s for o, n, s in zip(offsets, lengths, shape, strict=True)):
            raise self.fail(where, f"box at {list(offsets)} of {list(lengths)} does not fit shape {list(shape)}")
        start, stop = self.get(p, "start", int, where), self.get(p, "stop", int, where)
        span = self.ints(p.get("bytes"), f"{where}.bytes")
        if not 0 <= start <= stop <= math.prod(lengths):
            raise self.fail(where, f"range {start}..{stop} does not fit its box of {math.prod(lengths)} elements")
        begin, end = (span[0], span[1]) if len(span) == 2 else (0, -1)
        if end - begin != (stop - start) * itemsize or end > sizes[file]:
            raise self.fail(f"{where}.bytes", f"{p['bytes']} do not hold {stop - start} elements of {itemsize} bytes "
                                              f"inside {file!r} ({sizes[file]} bytes)")
        if self.version < 3:
            return SavedPiece(file, offsets, lengths, start, stop, begin, end)
        block = self.get(p, "block_bytes", int, where)
        digests = self.list(p.get("xxh3_128"), f"{where}.xxh3_128")
        if block < 1 or len(digests) != -(-(end - begin) // block) or not all(
                isinstance(d, str) and _HEX128.match(d) for d in digests):
            raise self.fail(f"{where}.xxh3_128", f"is not one xxh3-128 digest per block of {block} bytes of its "
                                                 f"{end - begin} bytes")
        return SavedPiece(file, offsets, lengths, start, stop, begin, end, block, tuple(digests))

    def chunk(self, value: Any, shape: tuple[int, ...], where: str) -> ChunkInfo | None:
        if value is None:
            return None
        c = self.obj(value, where)
        self.fields(c, "chunk", where)
        full = tuple(self.ints(c.get("shape"), f"{where}.shape"))
        start, stop = self.get(c, "start", int, where), self.get(c, "stop", int, where)
        if not (0 <= start <= stop <= math.prod(full)) or list(shape) != [stop - start]:
            raise self.fail(where, f"range {start}..{stop} does not fit shape {list(full)} and piece {list(shape)}")
        return ChunkInfo(full, start, stop)

    def file(self, key: str, index: int, value: Any) -> FileEntry:
        where = f"components.{key}.files[{index}]"
        f = self.obj(value, where)
        self.fields(f, "file", where)
        path = self.get(f, "path", str, where)
        norm = posixpath.normpath(path)
        if path.startswith("/") or "\\" in path or norm.startswith("..") or norm != path or not path:
            raise self.fail(f"{where}.path", f"{path!r} is not a plain relative path inside the checkpoint")
        if not path.startswith(f"{key}/") or "\x00" in path:
            raise self.fail(f"{where}.path", f"{path!r} is not inside the component's folder {key + '/'!r}")
        kind = self.get(f, "kind", str, where)
        if kind not in FILE_KINDS:
            raise self.fail(f"{where}.kind", f"is {kind!r}, expected one of {FILE_KINDS}")
        owner = f.get("owner")
        if owner is not None and type(owner) is not int:
            raise self.fail(f"{where}.owner", "should be an integer or null")
        if owner is not None and owner < 0:
            raise self.fail(f"{where}.owner", f"is negative: {owner}")
        tensors = []
        names: set[str] = set()
        for j, t in enumerate(self.list(f.get("tensors", []), f"{where}.tensors")):
            t = self.obj(t, f"{where}.tensors[{j}]")
            self.fields(t, "tensor", f"{where}.tensors[{j}]")
            dtype = self.get(t, "dtype", str, f"{where}.tensors[{j}]")
            if dtype not in ST_TO_DTYPE:
                raise self.fail(f"{where}.tensors[{j}].dtype", f"is unknown: {dtype!r}")
            shape = tuple(self.ints(t.get("shape"), f"{where}.tensors[{j}].shape"))
            name = self.get(t, "name", str, f"{where}.tensors[{j}]")
            if not name or name in names:
                raise self.fail(f"{where}.tensors[{j}].name", f"{name!r} is empty or appears twice in the file")
            names.add(name)
            tensors.append(TensorInfo(name, dtype, shape,
                                      self.chunk(t.get("chunk"), shape, f"{where}.tensors[{j}].chunk")))
        if kind == "state" and tensors:
            raise self.fail(f"{where}.tensors", "lists tensors for a state (msgpack) file")
        nbytes = self.get(f, "nbytes", int, where)
        if nbytes < 0:
            raise self.fail(f"{where}.nbytes", "is negative")
        digest = self.get(f, "xxh3_128", str, where)
        if not _HEX128.match(digest):
            raise self.fail(f"{where}.xxh3_128", f"is {digest!r}, not 32 lowercase hex digits")
        return FileEntry(path=path, kind=kind, writer_rank=self.rank(self.get(f, "writer_rank", int, where),
                                                                     f"{where}.writer_rank"),
                         owner=owner, nbytes=nbytes, xxh3_128=digest, tensors=tuple(tensors))


__all__ = ["READABLE_VERSIONS", "parse_manifest", "read_manifest", "refuse_linked_folder"]
