"""Reading a msgpack skeleton back into a state dict, safely, whatever bytes the file holds.

The skeleton's few non-msgpack types (tuple, OrderedDict, tensor reference, NumPy array/scalar, big int,
torch dtype) are msgpack extension values. They are decoded here without recursion on the C stack: the
unpacker only wraps each extension value (`_Ext`), and the tree is then rebuilt with an explicit work
stack, so a file of extension values nested thousands deep is refused like any other damage instead of
killing the process. Nesting depth is bounded (`MAX_DEPTH`, the same bound a save enforces), container
sizes are bounded by the file's own size, and every refusal is a CorruptCheckpointError naming the file,
the component and the key path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from ..errors import CorruptCheckpointError
from .tensor_io import DTYPE_TO_ST

EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_NDARRAY = 3
EXT_NPSCALAR = 4
EXT_BIGINT = 5
EXT_ORDEREDDICT = 6
EXT_DTYPE = 7
EXT_RAW_TENSOR = 8  # [name, torch dtype]: tensor `name` holds the value's bytes as uint8[..., element size]

MAX_DEPTH = 100
"""The deepest nesting of containers (dicts, lists, tuples) a state dict may have, below its top level.
A save refuses deeper state; a load refuses a skeleton that claims it."""

# NumPy kinds that are plain bytes; object, void and datetime arrays are refused.
NUMPY_KINDS = frozenset("biufc")
TORCH_DTYPES = {str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)}


def escape_segment(segment: str) -> str:
    """One key of a nested path, with '/' made unambiguous ('~' -> '~0', '/' -> '~1')."""
    return segment.replace("~", "~0").replace("/", "~1")


def join_path(parent: str, key: object) -> str:
    part = escape_segment(str(key))
    return f"{parent}/{part}" if parent else part


def path_depth(path: str) -> int:
    """How deep the container at key path `path` is (0: the state dict itself)."""
    return path.count("/") + 1 if path else 0


def shorten_path(path: str, limit: int = 120) -> str:
    """A key path cut to a readable length for a message (a hostile file's can be thousands of segments)."""
    return path if len(path) <= limit else f"{path[:limit // 2]}...{path[-limit // 3:]}"


@dataclass(frozen=True)
class _Ext:
    """An extension value as the unpacker found it; decoded later, off the C stack."""

    code: int
    data: bytes


@dataclass
class _Frame:
    """A container being rebuilt: its keys and raw values, and the values rebuilt so far."""

    path: str
    keys: list[Any]
    values: list[Any]
    make: Callable[[list[Any], list[Any]], Any]
    done: list[Any] = field(default_factory=list)


def unflatten_state(skeleton: bytes, tensors: Mapping[str, torch.Tensor], component: str,
                    source: str | None = None) -> Any:
    """Rebuild a state dict from its skeleton and tensors (found by name in `tensors`). `source`: the file
    the skeleton came from, for the error. Raises CorruptCheckpointError for anything ckpt did not write."""
    decoder = _Decoder(tensors, component, source)
    state = decoder.build(decoder.unpack(skeleton, ""))
    if decoder.missing:
        raise CorruptCheckpointError(
            f"{decoder.where}: component {component!r}: tensors {sorted(decoder.missing)[:5]} are referenced but "
            "were not found in its files", path=source, component=component)
    return state


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], component: str, source: str | None):
        self.tensors, self.component, self.source = tensors, component, source
        self.where = source or "a state file"
        self.missing: list[str] = []

    def fail(self, path: str, what: str) -> CorruptCheckpointError:
        key = shorten_path(path) or "(the state dict itself)"
        return CorruptCheckpointError(f"{self.where} (component {self.component!r}) cannot be decoded: key {key!r} "
                                      f"{what}", path=self.source, component=self.component, key_path=path)

    def unpack(self, data: bytes, path: str) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_Ext)
        except Exception as exc:  # msgpack raises several types for malformed input
            raise self.fail(path, f"is not valid msgpack ({type(exc).__name__}: {exc})") from None

    def build(self, root: Any) -> Any:
        """The value `root` (as unpacked) with every container and extension value rebuilt, iteratively."""
        leaf, frame = self.open(root, "")
        if frame is None:
            return leaf
        stack = [frame]
        while True:
            top = stack[-1]
            if len(top.done) == len(top.values):
                stack.pop()
                built = top.make(top.keys, top.done)
                if not stack:
                    return built
                stack[-1].done.append(built)
                continue
            i = len(top.done)
            leaf, frame = self.open(top.values[i], join_path(top.path, top.keys[i]))
            if frame is None:
                top.done.append(leaf)
            else:
                stack.append(frame)

    def open(self, value: Any, path: str) -> tuple[Any, _Frame | None]:
        """(the decoded value, None) for a leaf; (None, a frame to fill) for a container."""
        if isinstance(value, dict):
            self.check_depth(path)
            keys = [self.key(k, path) for k in value]
            return None, _Frame(path, keys, list(value.values()), lambda k, v: dict(zip(k, v, strict=True)))
        if isinstance(value, list):
            self.check_depth(path)
            return None, _Frame(path, list(range(len(value))), value, lambda k, v: v)
        if not isinstance(value, _Ext):
            if value is not None and type(value) not in (bool, int, float, str, bytes):  # a msgpack Timestamp
                raise self.fail(path, f"holds a {type(value).__name__}, which ckpt does not write")
            return value, None
        if value.code == EXT_TUPLE:
            self.check_depth(path)
            items = self.payload(value, path, list)
            return None, _Frame(path, list(range(len(items))), items, lambda k, v: tuple(v))
        if value.code == EXT_ORDEREDDICT:
            self.check_depth(path)
            pairs = self.payload(value, path, list)
            if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise self.fail(path, "is an OrderedDict whose items are not [key, value] pairs")
            keys = [self.key(p[0], path) for p in pairs]
            return None, _Frame(path, keys, [p[1] for p in pairs], lambda k, v: OrderedDict(zip(k, v, strict=True)))
        return self.leaf(value, path), None

    def check_depth(self, path: str) -> None:
        if path_depth(path) > MAX_DEPTH:
            raise self.fail(path, f"is nested more than {MAX_DEPTH} containers deep, deeper than ckpt saves")

    def key(self, key: Any, path: str) -> int | str:
        if type(key) is str or type(key) is int:
            return key
        raise self.fail(path, f"has a key of type {type(key).__name__}; ckpt writes only str and int keys")

    def payload(self, ext: _Ext, path: str, kind: type) -> Any:
        value = self.unpack(ext.data, path)
        if not isinstance(value, kind):
            raise self.fail(path, f"holds a value of type {ext.code} whose payload is {type(value).__name__}, not "
                            f"{kind.__name__}")
        return value

    def leaf(self, ext: _Ext, path: str) -> Any:
        decode = _LEAVES.get(ext.code)
        if decode is None:
            raise self.fail(path, f"holds a value of unknown type {ext.code} (ckpt writes types 1-8)")
        try:
            return decode(self, ext, path)
        except CorruptCheckpointError:
            raise
        except Exception as exc:  # a payload of the right type but wrong content: bad UTF-8, shape, dtype
            raise self.fail(path, f"holds a value of type {ext.code} that cannot be decoded ({type(exc).__name__}: "
                            f"{exc})") from None

    def tensor(self, name: str) -> torch.Tensor | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        return self.tensors[name]

    def plain(self, ext: _Ext, path: str, types: tuple[type, ...]) -> list[Any]:
        """The payload as a list of exactly `types` (no nested extension values)."""
        value = self.payload(ext, path, list)
        if len(value) != len(types) or not all(isinstance(v, t) for v, t in zip(value, types, strict=True)):
            raise self.fail(path, f"holds a value of type {ext.code} whose payload is not "
                            f"[{', '.join(t.__name__ for t in types)}]")
        return value


def _decode_tensor(d: _Decoder, ext: _Ext, path: str) -> torch.Tensor | None:
    return d.tensor(ext.data.decode())


def _decode_raw_tensor(d: _Decoder, ext: _Ext, path: str) -> torch.Tensor | None:
    name, dtype = d.plain(ext, path, (str, str))
    raw = d.tensor(name)
    return None if raw is None else from_raw_bytes(raw, dtype, name, d.component, d.source)


def _decode_ndarray(d: _Decoder, ext: _Ext, path: str) -> np.ndarray:
    dtype_str, shape, raw = d.plain(ext, path, (str, list, bytes))
    if not all(type(n) is int and n >= 0 for n in shape):
        raise d.fail(path, f"is a NumPy array whose shape is not a list of sizes: {shape[:8]}")
    return np.frombuffer(raw, dtype=_safe_numpy_dtype(d, dtype_str, path)).reshape(shape).copy()


def _decode_npscalar(d: _Decoder, ext: _Ext, path: str) -> np.generic:
    dtype_str, raw = d.plain(ext, path, (str, bytes))
    dtype = _safe_numpy_dtype(d, dtype_str, path)
    if len(raw) != dtype.itemsize:
        raise d.fail(path, f"is a NumPy {dtype} scalar of {len(raw)} bytes, not {dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)[0]


def _decode_dtype(d: _Decoder, ext: _Ext, path: str) -> torch.dtype:
    name = ext.data.decode()
    if name not in TORCH_DTYPES:
        raise d.fail(path, f"holds an unknown torch dtype {name!r}")
    return TORCH_DTYPES[name]


def _decode_bigint(d: _Decoder, ext: _Ext, path: str) -> int:
    text = ext.data.decode("ascii")
    if not text.lstrip("-").isdigit():
        raise d.fail(path, f"holds a big integer that is not a number: {text[:40]!r}")
    return int(text)


def _safe_numpy_dtype(d: _Decoder, dtype_str: str, path: str) -> np.dtype:
    dtype = np.dtype(dtype_str)
    if dtype.kind not in NUMPY_KINDS or dtype.fields is not None:
        raise d.fail(path, f"is a NumPy value of dtype {dtype_str!r}: refusing NumPy dtype {dtype_str!r} in a skeleton")
    return dtype


_LEAVES: dict[int, Callable[[_Decoder, _Ext, str], Any]] = {
    EXT_TENSOR: _decode_tensor,
    EXT_RAW_TENSOR: _decode_raw_tensor,
    EXT_NDARRAY: _decode_ndarray,
    EXT_NPSCALAR: _decode_npscalar,
    EXT_BIGINT: _decode_bigint,
    EXT_DTYPE: _decode_dtype,
}


def from_raw_bytes(raw: torch.Tensor, dtype_name: object, name: str, component: str,
                   source: str | None = None) -> torch.Tensor:
    """The tensor of `dtype_name` whose bytes `raw` holds (as a save made them), sharing its memory."""
    where = source or "a state file"
    dtype = TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None or dtype in DTYPE_TO_ST:
        raise CorruptCheckpointError(f"{where} (component {component!r}): tensor {name!r} is recorded as raw bytes of "
                                     f"dtype {dtype_name!r}, which is not a dtype ckpt stores that way", path=source,
                                     component=component)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if raw.dtype != torch.uint8 or raw.dim() < 1 or raw.shape[-1] != itemsize:
        raise CorruptCheckpointError(f"{where} (component {component!r}): tensor {name!r} should hold {dtype_name} "
                                     f"values as uint8[..., {itemsize}] but is {raw.dtype}{list(raw.shape)}",
                                     path=source, component=component)
    try:
        return raw.view(dtype).squeeze(-1)
    except RuntimeError:  # misaligned or strided memory (not what ckpt's readers give): a fresh copy is neither
        return raw.clone(memory_format=torch.contiguous_format).view(dtype).squeeze(-1)


__all__ = ["MAX_DEPTH", "escape_segment", "from_raw_bytes", "join_path", "path_depth", "unflatten_state"]
