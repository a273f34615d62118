"""Split a state dict into named tensors and a msgpack skeleton, and put it back together.

The skeleton holds every non-tensor value and the structure around the tensors; each tensor in it is
replaced by a reference to its name. Only plain data is accepted (no pickle), so unpacking a skeleton
never runs code: the few non-msgpack types (tuple, OrderedDict, tensor reference, NumPy array/scalar,
big int, torch dtype) are msgpack extension types decoded by the table below.

A tensor whose dtype safetensors has no code for (complex128, complex32, float8_e8m0fnu, ...) is stored
as its raw bytes: a uint8 tensor with one more dimension (the element size), referenced from the skeleton
together with its real dtype, so it loads back bit for bit as what was saved.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from ..errors import SerializationError
from .tensor_io import DTYPE_TO_ST

_EXT_TUPLE = 1
_EXT_TENSOR = 2
_EXT_NDARRAY = 3
_EXT_NPSCALAR = 4
_EXT_BIGINT = 5
_EXT_ORDEREDDICT = 6
_EXT_DTYPE = 7
_EXT_RAW_TENSOR = 8  # [name, torch dtype]: tensor `name` holds the value's bytes as uint8[..., element size]

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# NumPy kinds that are plain bytes; object, void and datetime arrays are refused.
_NUMPY_KINDS = frozenset("biufc")
_TORCH_DTYPES = {str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)}


@dataclass(frozen=True)
class FlatState:
    """A state dict taken apart: `tensors` by name, everything else packed in `skeleton`."""

    tensors: dict[str, torch.Tensor]
    skeleton: bytes


def escape_segment(segment: str) -> str:
    """One key of a nested path, with '/' made unambiguous ('~' -> '~0', '/' -> '~1')."""
    return segment.replace("~", "~0").replace("/", "~1")


def join_path(parent: str, key: object) -> str:
    part = escape_segment(str(key))
    return f"{parent}/{part}" if parent else part


def flatten_state(state: Mapping[str, Any], component: str) -> FlatState:
    """Take `state` apart. Raises SerializationError naming the component and key path of a bad value."""
    if not isinstance(state, Mapping):
        raise SerializationError(
            f"component {component!r}: state_dict() returned {type(state).__name__}, not a dict",
            component=component,
        )
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(_encode(state, "", tensors, component))
    return FlatState(tensors=tensors, skeleton=skeleton)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], component: str) -> Any:
    # Exact type checks first: bool before int (bool is an int), plain containers before subclasses.
    kind = type(value)
    if value is None or kind in (bool, str, bytes, float):
        return value
    if kind is int:
        return value if _INT64_MIN <= value <= _UINT64_MAX else msgpack.ExtType(_EXT_BIGINT, str(value).encode())
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, path, tensors, component)
    if isinstance(value, Mapping):
        items = [(_check_key(k, path, component), v) for k, v in value.items()]
        encoded = {k: _encode(v, join_path(path, k), tensors, component) for k, v in items}
        if len(encoded) != len(items):
            raise _error(component, path, "has keys that collide once converted")
        if isinstance(value, OrderedDict):
            return msgpack.ExtType(_EXT_ORDEREDDICT, _pack(list(encoded.items())))
        return encoded
    if isinstance(value, list):
        return [_encode(v, join_path(path, i), tensors, component) for i, v in enumerate(value)]
    if isinstance(value, tuple):  # torch.Size and named tuples come back as plain tuples
        items = [_encode(v, join_path(path, i), tensors, component) for i, v in enumerate(value)]
        return msgpack.ExtType(_EXT_TUPLE, _pack(items))
    if isinstance(value, np.ndarray):
        _check_numpy_dtype(value.dtype, path, component)
        if kind is not np.ndarray:  # a masked array's mask, a matrix's type: lost if stored as a plain array
            raise _error(component, path, f"is a {kind.__module__}.{kind.__qualname__} (a NumPy array subclass), "
                         "which would load back as a plain array; convert it with np.asarray() in state_dict()")
        # tobytes() is C order for any layout; the shape is the array's own (0-d stays 0-d).
        return msgpack.ExtType(_EXT_NDARRAY, _pack([value.dtype.str, list(value.shape), value.tobytes()]))
    if isinstance(value, np.generic):
        _check_numpy_dtype(value.dtype, path, component)
        return msgpack.ExtType(_EXT_NPSCALAR, _pack([value.dtype.str, value.tobytes()]))
    if isinstance(value, bool | int | float | str | bytes):  # subclasses (IntEnum, str enums, ...)
        return _encode(_plain_base(value), path, tensors, component)
    if isinstance(value, torch.dtype):
        return msgpack.ExtType(_EXT_DTYPE, str(value).removeprefix("torch.").encode())
    raise _error(
        component,
        path,
        f"holds a {kind.__module__}.{kind.__qualname__}, which cannot be stored without pickle; "
        "convert it to tensors, numbers, strings, bytes, lists, tuples or dicts in state_dict()",
    )


def _plain_base(value: Any) -> Any:
    for base in (bool, int, float, str, bytes):
        if isinstance(value, base):
            return base(value)
    return value


def _encode_tensor(value: torch.Tensor, path: str, tensors: dict[str, torch.Tensor], component: str) -> Any:
    if value.layout is not torch.strided or value.is_quantized or value.is_nested:
        raise _error(component, path, f"is a {value.layout} tensor; only dense tensors can be stored")
    if value.device.type == "meta":
        raise _error(component, path, "is on the meta device, so it has no values to store; materialize it "
                     "(module.to_empty(device=...) and initialise it, or load real weights) before saving")
    name = path or "(root)"
    if name in tensors:
        raise _error(component, path, "names a tensor twice (keys that differ only in type, e.g. 0 and '0')")
    if value.dtype in DTYPE_TO_ST:
        tensors[name] = value.detach()
        return msgpack.ExtType(_EXT_TENSOR, name.encode())
    tensors[name] = _raw_bytes(value, path, component)
    return msgpack.ExtType(_EXT_RAW_TENSOR, _pack([name, _dtype_name(value.dtype)]))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw_bytes(value: torch.Tensor, path: str, component: str) -> torch.Tensor:
    """A uint8 view of the tensor's bytes, shape (*value.shape, element size), sharing its memory."""
    t = value.detach().resolve_conj().resolve_neg()
    name = _dtype_name(t.dtype)
    why = "" if _TORCH_DTYPES.get(name) is t.dtype else "a load could not look its name up"
    if not why:
        try:
            return t.unsqueeze(-1).view(torch.uint8)
        except RuntimeError as exc:
            why = str(exc).splitlines()[0]
    supported = ", ".join(sorted(_dtype_name(d) for d in DTYPE_TO_ST))
    raise _error(component, path, f"is a tensor of dtype {name}, which cannot be stored ({why}). Stored natively: "
                 f"{supported}; other fixed-size dtypes as raw bytes. Convert it with .to(dtype) in state_dict()")


def _check_key(key: Any, path: str, component: str) -> int | str:
    if type(key) is str or type(key) is int:
        return key
    raise _error(component, path, f"has a key {key!r} of type {type(key).__name__}; keys must be str or int")


def _check_numpy_dtype(dtype: np.dtype, path: str, component: str) -> None:
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise _error(component, path, f"is a NumPy value of dtype {dtype}; only numeric dtypes can be stored")


def _error(component: str, path: str, what: str) -> SerializationError:
    where = path or "(the state dict itself)"
    return SerializationError(f"component {component!r}, key {where!r} {what}", component=component, key_path=path)


def unflatten_state(skeleton: bytes, tensors: Mapping[str, torch.Tensor], component: str) -> Any:
    """Rebuild a state dict from its skeleton and tensors (found by name in `tensors`)."""
    missing: list[str] = []

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_TENSOR:
            name = data.decode()
            if name not in tensors:
                missing.append(name)
                return None
            return tensors[name]
        if code == _EXT_RAW_TENSOR:
            name, dtype = unpack(data)
            if name not in tensors:
                missing.append(name)
                return None
            return _from_raw_bytes(tensors[name], dtype, name, component)
        decoder = _DECODERS.get(code)
        if decoder is None:
            raise SerializationError(f"component {component!r}: unknown value type {code} in its skeleton")
        return decoder(data, unpack)

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=ext_hook)

    try:
        state = unpack(skeleton)
    except SerializationError:
        raise
    except Exception as exc:  # msgpack raises several types for malformed input
        raise SerializationError(f"component {component!r}: its skeleton cannot be read ({exc})") from exc
    if missing:
        raise SerializationError(
            f"component {component!r}: tensors {sorted(missing)[:5]} are referenced but were not found "
            "in its files",
            component=component,
        )
    return state


def _from_raw_bytes(raw: torch.Tensor, dtype_name: object, name: str, component: str) -> torch.Tensor:
    """The tensor of `dtype_name` whose bytes `raw` holds (as `_raw_bytes` made them), sharing its memory."""
    dtype = _TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None or dtype in DTYPE_TO_ST:
        raise SerializationError(f"component {component!r}: tensor {name!r} is recorded as raw bytes of dtype "
                                 f"{dtype_name!r}, which is not a dtype ckpt stores that way", component=component)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if raw.dtype != torch.uint8 or raw.dim() < 1 or raw.shape[-1] != itemsize:
        raise SerializationError(f"component {component!r}: tensor {name!r} should hold {dtype_name} values as "
                                 f"uint8[..., {itemsize}] but is {raw.dtype}{list(raw.shape)}", component=component)
    try:
        return raw.view(dtype).squeeze(-1)
    except RuntimeError:  # misaligned or strided memory (not what ckpt's readers give): a fresh copy is neither
        return raw.clone(memory_format=torch.contiguous_format).view(dtype).squeeze(-1)


def _decode_ndarray(data: bytes, unpack: Callable[[bytes], Any]) -> np.ndarray:
    dtype_str, shape, raw = unpack(data)
    dtype = _safe_numpy_dtype(dtype_str)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _decode_npscalar(data: bytes, unpack: Callable[[bytes], Any]) -> np.generic:
    dtype_str, raw = unpack(data)
    return np.frombuffer(raw, dtype=_safe_numpy_dtype(dtype_str))[0]


def _decode_dtype(data: bytes, unpack: Callable[[bytes], Any]) -> torch.dtype:
    name = data.decode()
    if name not in _TORCH_DTYPES:
        raise SerializationError(f"unknown torch dtype {name!r} in a skeleton")
    return _TORCH_DTYPES[name]


def _safe_numpy_dtype(dtype_str: str) -> np.dtype:
    dtype = np.dtype(str(dtype_str))
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise SerializationError(f"refusing NumPy dtype {dtype_str!r} in a skeleton")
    return dtype


_DECODERS: dict[int, Callable[[bytes, Callable[[bytes], Any]], Any]] = {
    _EXT_TUPLE: lambda data, unpack: tuple(unpack(data)),
    _EXT_ORDEREDDICT: lambda data, unpack: OrderedDict(unpack(data)),
    _EXT_BIGINT: lambda data, unpack: int(data.decode()),
    _EXT_NDARRAY: _decode_ndarray,
    _EXT_NPSCALAR: _decode_npscalar,
    _EXT_DTYPE: _decode_dtype,
}
