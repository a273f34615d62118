"""Reading and writing checkpoint files: safetensors for tensors, raw bytes for msgpack skeletons.

Files are written straight from each tensor's memory (no staging copy of the whole state) and hashed
(xxh3-128) as the bytes go out; reads fill each tensor (a new one, or the caller's own in place) and hash
the bytes in the same pass. Both work in slices small enough to stay in the CPU cache between the copy and
the hash, so the digest costs no second pass over memory.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import mmap
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch
import xxhash

from ..errors import CorruptCheckpointError
from ..io.storage import Storage
from .digests import BlockDigests, BlockHasher, new_hasher

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}

_ALIGN = 8  # data section starts 8-aligned; tensors are ordered widest dtype first so each stays aligned
_MAX_HEADER = 256 * 1024 * 1024
# Reads and writes go in slices that stay in the CPU cache while they are hashed (one pass over memory).
_READ_CHUNK = 256 << 10
_MAP_CHUNK = 16 << 20  # bytes of a mapped file hashed per call
_WRITE_SLICE = 1 << 20
_GATHER_BELOW = 1 << 20  # tensors smaller than this are written (and hashed) in blocks of about this size


@dataclass(frozen=True)
class ChunkInfo:
    """Where a stored piece sits: elements [start, stop) of the flattened tensor of `shape`."""

    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as recorded in a manifest (`chunk` set when the file holds only a piece of it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunk: ChunkInfo | None = None


@dataclass(frozen=True)
class WrittenFile:
    """What a write produced: its size, its xxh3-128 digest and the tensors in it."""

    nbytes: int
    digest: str
    tensors: tuple[TensorInfo, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()  # each tensor's bytes [begin, end), counted from the file's start
    blocks: tuple[BlockDigests, ...] = ()  # each tensor's block digests (when asked for), in the order of `tensors`


def st_dtype(tensor: torch.Tensor, name: str) -> str:
    try:
        return DTYPE_TO_ST[tensor.dtype]
    except KeyError:
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in DTYPE_TO_ST))
        raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store "
                        f"(supported: {supported})") from None


# dtypes numpy holds with the same bytes: a plain CPU tensor of these is viewed without torch's view chain.
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool, torch.complex64})


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already a plain CPU tensor."""
    if (tensor.dtype in _NUMPY_DTYPES and tensor.device.type == "cpu" and tensor.dim() > 0 and tensor.numel() > 0
            and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()):
        return memoryview(tensor.detach().numpy()).cast("B")  # the common case, once per tensor: kept short
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # one element behind a stride counts as contiguous, yet cannot be viewed as bytes
        flat = flat.as_strided((1,), (1,))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors(
    storage: Storage, path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
    chunks: Mapping[str, ChunkInfo] | None = None, block_digests: bool = False,
) -> WrittenFile:
    """Write a safetensors file from `(name, tensor)` pairs, hashing the bytes as they are written.
    `chunks` marks entries that are pieces of a larger tensor (recorded in the returned infos).
    `block_digests`: also digest each tensor's bytes in blocks (`BlockDigests`), from the same cache-sized
    slices the file's digest is taken from (no second pass over memory)."""
    ordered = sorted(tensors, key=lambda item: -item[1].element_size())
    header: dict[str, object] = {}
    infos: list[TensorInfo] = []
    offset = 0
    for name, tensor in ordered:
        dtype = st_dtype(tensor, name)
        nbytes = tensor.numel() * tensor.element_size()
        shape = tuple(int(s) for s in tensor.shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        infos.append(TensorInfo(name, dtype, shape, (chunks or {}).get(name)))
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % _ALIGN)
    data_start = 8 + len(header_bytes)
    spans = tuple((data_start + e["data_offsets"][0], data_start + e["data_offsets"][1])  # type: ignore[index]
                  for name, e in header.items() if name != "__metadata__")
    hasher = new_hasher()
    blocks = [BlockHasher(end - begin) for begin, end in spans] if block_digests else None

    def chunks() -> Iterator[memoryview | bytes]:
        # Small tensors go out gathered into blocks: one write and one hash update per block, not per tensor.
        pending: list[memoryview | bytes] = [struct.pack("<Q", len(header_bytes)), header_bytes]
        size = 0
        for i, (_, tensor) in enumerate(ordered):
            data = tensor_bytes(tensor)
            own = None if blocks is None else blocks[i]
            if len(data) < _GATHER_BELOW:
                if own is not None:
                    own.update(data)
                pending.append(data)
                size += len(data)
                if size >= _GATHER_BELOW:
                    yield from _hashed_slices(hasher, b"".join(pending))
                    pending, size = [], 0
                continue
            if pending:
                yield from _hashed_slices(hasher, b"".join(pending))
                pending, size = [], 0
            yield from _hashed_slices(hasher, data, own)
        if pending:
            yield from _hashed_slices(hasher, b"".join(pending))

    nbytes = storage.write_file(path, chunks())
    return WrittenFile(nbytes=nbytes, digest=hasher.hexdigest(), tensors=tuple(infos), spans=spans,
                       blocks=tuple(b.result() for b in blocks) if blocks is not None else ())


def _hashed_slices(hasher: xxhash.xxh3_128, data: memoryview | bytes,
                   also: BlockHasher | None = None) -> Iterator[memoryview]:
    """`data` in slices small enough to stay in the CPU cache between hashing them and writing them out:
    one pass over memory instead of two (measured faster than hashing on a helper thread). `also` hashes
    each slice too, while it is in the cache."""
    view = memoryview(data)
    for at in range(0, len(view), _WRITE_SLICE):
        piece = view[at: at + _WRITE_SLICE]
        hasher.update(piece)
        if also is not None:
            also.update(piece)
        yield piece


def write_blob(storage: Storage, path: str, data: bytes) -> WrittenFile:
    nbytes = storage.write_file(path, [data])
    return WrittenFile(nbytes=nbytes, digest=xxhash.xxh3_128_hexdigest(data))


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def _bad_file(path: str, component: str | None, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"file {path} (component {component!r}) is not a valid safetensors file: {why}",
                                  path=path, component=component)


def parse_header(header_bytes: bytes, data_len: int, path: str, component: str | None) -> list[_Entry]:
    """The tensors a safetensors header describes, in file order. Every field is checked."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_file(path, component, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad_file(path, component, "header is not a JSON object")
    entries = [_parse_entry(name, e, data_len, path, component) for name, e in header.items() if name != "__metadata__"]
    entries.sort(key=lambda e: (e.begin, e.end))
    for a, b in itertools.pairwise(entries):
        if b.begin < a.end:
            raise _bad_file(path, component, f"tensors {a.name!r} and {b.name!r} overlap")
    return entries


def _parse_entry(name: str, entry: object, data_len: int, path: str, component: str | None) -> _Entry:
    def bad(why: str) -> CorruptCheckpointError:
        return _bad_file(path, component, f"tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise bad("has an entry that is not an object")
    dtype = ST_TO_DTYPE.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise bad(f"has unknown dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise bad(f"has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"has bad data_offsets {offsets!r}")
    begin, end = offsets
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if not 0 <= begin <= end <= data_len:
        raise bad(f"claims bytes {begin}..{end} but the file's data section has {data_len}")
    if end - begin != numel * itemsize:
        raise bad(f"has {end - begin} bytes for shape {shape} of {dtype} ({numel * itemsize} needed)")
    return _Entry(name, dtype, shape, begin, end)


def read_safetensors(storage: Storage, path: str, expected_size: int | None, expected_digest: str | None,
                     component: str | None = None, into: Mapping[str, torch.Tensor] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Read a safetensors file into one tensor per entry, hashing the bytes in the same pass.

    Each tensor gets its own storage (consumers such as RNG state setters ignore storage offsets), and
    nothing is read twice. With `into`, an entry whose name, dtype and shape match a contiguous CPU
    tensor there is read straight into it (in place, no new memory). Size, header and digest are all
    checked; a mismatch names the file.
    """
    size = _checked_size(storage, path, expected_size, component)
    hasher = new_hasher() if expected_digest is not None else _NoHash()
    out: dict[str, torch.Tensor] = {}
    _read_entries(storage, path, size, component, into, hasher, out)
    _check_digest(hasher, expected_digest, path, component)
    return out


def _read_entries(storage: Storage, path: str, size: int, component: str | None,
                  into: Mapping[str, torch.Tensor] | None, hasher, out: dict[str, torch.Tensor]) -> None:
    with storage.open_read(path) as f:
        prefix, header_bytes = _read_prefix(f, size, path, component)
        hasher.update(prefix)
        hasher.update(header_bytes)
        data_len = size - len(prefix) - len(header_bytes)
        pos = 0
        for e in parse_header(header_bytes, data_len, path, component):
            if e.begin > pos:  # bytes no tensor claims still count toward the digest
                hasher.update(_read_exact(f, e.begin - pos, path, component))
            tensor = _destination(into, e)
            if e.end > e.begin:
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
                _readinto_exact(f, view, path, component, hasher)
            out[e.name] = tensor
            pos = e.end
        if pos < data_len:
            hasher.update(_read_exact(f, data_len - pos, path, component))


def _read_prefix(f, size: int, path: str, component: str | None) -> tuple[bytes, bytes]:
    """The 8-byte header length and the header of an open safetensors file of `size` bytes."""
    if size < 8:
        raise _bad_file(path, component, "shorter than its 8-byte header length")
    prefix = _read_exact(f, 8, path, component)
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(size - 8, _MAX_HEADER):
        raise _bad_file(path, component, f"header length {header_len} runs past the end of the file ({size} bytes)")
    return prefix, _read_exact(f, header_len, path, component)


def read_header(storage: Storage, path: str, expected_size: int | None,
                component: str | None = None) -> dict[str, tuple[torch.dtype, list[int]]]:
    """The tensors (dtype, shape) a safetensors file's header describes, checked as a read checks them
    (offsets inside the data section, sizes that fit the shapes, no overlaps), without reading the data."""
    size = _checked_size(storage, path, expected_size, component)
    with storage.open_read(path) as f:
        prefix, header_bytes = _read_prefix(f, size, path, component)
    entries = parse_header(header_bytes, size - len(prefix) - len(header_bytes), path, component)
    return {e.name: (e.dtype, list(e.shape)) for e in entries}


def verify_tensor_file(storage: Storage, path: str, expected_size: int | None, expected_digest: str,
                       component: str | None = None) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Check a safetensors file's size, header and digest without keeping its bytes: it is streamed through
    one small buffer (so checking a checkpoint allocates nothing of its size). Returns the tensors
    (dtype, shape) its header describes."""
    size = _checked_size(storage, path, expected_size, component)
    hasher = new_hasher()
    with storage.open_read(path) as f:
        prefix, header_bytes = _read_prefix(f, size, path, component)
        entries = parse_header(header_bytes, size - len(prefix) - len(header_bytes), path, component)
        hasher.update(prefix)
        hasher.update(header_bytes)
        start = len(prefix) + len(header_bytes)
        if not _hash_mapped(f, start, size, hasher):
            _hash_streamed(f, size - start, hasher, path, component)
    _check_digest(hasher, expected_digest, path, component)
    return {e.name: (e.dtype, list(e.shape)) for e in entries}


def _hash_mapped(f: BinaryIO, start: int, size: int, hasher: xxhash.xxh3_128) -> bool:
    """Hash bytes [start, size) of a local file through a read-only memory map: the page cache is read where
    it lies, with no copy and no buffer (xxh3 drops the GIL, so the io threads hash side by side). False where
    the file cannot be mapped (an object store's stream, an empty payload). Checkpoint files are never
    rewritten in place (a save writes new files and renames; retention unlinks), so a mapped file keeps its
    bytes while it is hashed."""
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    if size <= start:
        return False
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # shorter than its size now, or not a mappable file: streamed, and checked so
        return False
    with mapped:
        view = memoryview(mapped)
        try:
            for at in range(start, size, _MAP_CHUNK):
                end = min(at + _MAP_CHUNK, size)
                hasher.update(view[at:end])
                # Out of this process's resident set again (the page cache keeps them): a load's memory stays
                # the state plus one window per io thread, not the state plus every file it checked.
                page = at - at % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, page, end - page)
        finally:
            view.release()
    return True


def _hash_streamed(f: BinaryIO, left: int, hasher: xxhash.xxh3_128, path: str, component: str | None) -> None:
    buf = memoryview(bytearray(min(_READ_CHUNK, max(left, 1))))
    while left:
        n = f.readinto(buf[: min(len(buf), left)])
        if not n:
            raise CorruptCheckpointError(f"file {path} (component {component!r}) ended early", path=path,
                                         component=component)
        hasher.update(buf[:n])
        left -= n


def read_blob(storage: Storage, path: str, expected_size: int | None, expected_digest: str | None,
              component: str | None = None) -> bytes:
    """A whole small file (a msgpack skeleton), size- and digest-checked."""
    size = _checked_size(storage, path, expected_size, component)
    with storage.open_read(path) as f:
        data = _read_exact(f, size, path, component)
    hasher = new_hasher()
    hasher.update(data)
    _check_digest(hasher, expected_digest, path, component)
    return data


class _NoHash:
    def update(self, _data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _destination(into: Mapping[str, torch.Tensor] | None, e: _Entry) -> torch.Tensor:
    """The caller's own tensor for this entry when it can take the bytes directly, else a new one."""
    if into is not None:
        t = into.get(e.name)
        if (t is not None and t.device.type == "cpu" and t.dtype == e.dtype and list(t.shape) == e.shape
                and t.is_contiguous() and not t.requires_grad):
            return t
    return torch.empty(e.shape, dtype=e.dtype)


def _checked_size(storage: Storage, path: str, expected: int | None, component: str | None) -> int:
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"file {path} (component {component!r}) is missing", path=path,
                                     component=component) from None
    if expected is not None and size != expected:
        raise CorruptCheckpointError(
            f"file {path} (component {component!r}) has {size} bytes, the manifest says {expected}; "
            "it was truncated or replaced after the save", path=path, component=component)
    return size


def _check_digest(hasher, expected: str | None, path: str, component: str | None) -> None:
    if expected is not None and hasher.hexdigest() != expected:
        raise CorruptCheckpointError(
            f"file {path} (component {component!r}) does not match its digest in the manifest: its bytes "
            "changed after it was written; restore it or load another checkpoint", path=path, component=component)


def _read_exact(f, n: int, path: str, component: str | None) -> bytes:
    buf = bytearray(n)
    _readinto_exact(f, memoryview(buf), path, component, None)
    return bytes(buf)


def _readinto_exact(f, view: memoryview, path: str, component: str | None, hasher) -> None:
    pos, total = 0, len(view)
    bulk = getattr(f, "readinto_parallel", None)  # object storage: parallel ranged GETs straight into `view`
    if bulk is not None and total > _READ_CHUNK:
        got = bulk(view)
        if got < total:
            raise CorruptCheckpointError(f"file {path} (component {component!r}) ended early", path=path,
                                         component=component)
        if hasher is not None:
            for at in range(0, total, _WRITE_SLICE):
                hasher.update(view[at: at + _WRITE_SLICE])
        return
    while pos < total:
        n = f.readinto(view[pos: pos + _READ_CHUNK])
        if not n:
            raise CorruptCheckpointError(f"file {path} (component {component!r}) ended early", path=path,
                                         component=component)
        if hasher is not None:
            hasher.update(view[pos: pos + n])
        pos += n
