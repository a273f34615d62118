"""Object storage (S3, and servers that speak its API) behind the Storage protocol.

Paths are URLs, `s3://bucket/prefix/...`; a "folder" is a key prefix. The client is boto3 (the `ckpt[s3]`
extra), imported only when an s3:// path is first used; endpoint, region and credentials come from the
standard AWS settings exactly as boto3 reads them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).

Writes stream: a file's bytes are cut into parts as they arrive and the parts are uploaded in parallel
(multipart upload), so memory is bounded by the part buffers in flight, never by the state. Reads of a large
range are split into parallel ranged GETs, each received straight into its slice of the destination buffer.
There is no rename: a checkpoint is committed by creating its manifest with a conditional put
(`If-None-Match: *`, `write_new`), which refuses when the object already exists.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .threads import DaemonPool, wait_all

S3_EXTRA = "pip install 'ckpt[s3]'"
SCHEME = "s3://"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_CONFLICT = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_READ_AHEAD = 1 << 20  # small reads (headers, msgpack skeletons) are served from one GET of this much
_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
# A response is received in slices of this much: the HTTP client reads each slice into a temporary bytes
# object before copying it into the destination, so larger slices would cost that much memory per range.
_RECV_BYTES = 256 << 10


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the key has no leading or trailing slash."""
    if not url.startswith(SCHEME):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket; write s3://<bucket>/<prefix>")
    return bucket, "/".join(p for p in key.split("/") if p)


def _boto():
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise ImportError(f"s3:// run dirs need boto3, which ckpt installs only as an optional extra: {S3_EXTRA}") from None
    return boto3, botocore


@dataclass(frozen=True)
class S3Options:
    """How S3Storage moves bytes. Endpoint, region and credentials are not here: they come from the AWS
    settings (environment, config files, profiles) as boto3 reads them."""

    part_bytes: int = field(default=16 << 20, metadata={"help": "bytes per multipart part and per ranged GET"})
    in_flight: int = field(default=8, metadata={"help": "parts uploaded or ranges fetched at once, per process; "
                                                        "upload memory is at most in_flight * part_bytes"})
    lock_lease_s: float = field(default=60.0, metadata={"help": "seconds the run dir's lock object stays valid "
                                                                "without renewal (a live job renews it every third)"})
    max_attempts: int = field(default=3, metadata={"help": "tries per request (boto3 standard retry mode)"})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds to wait to connect, and for each read of a "
                                                             "response, before a try counts as failed"})

    def __post_init__(self) -> None:
        if isinstance(self.part_bytes, bool) or not isinstance(self.part_bytes, int) or self.part_bytes < 5 << 20:
            raise ValueError(f"S3Options: part_bytes={self.part_bytes!r} must be an int >= 5 MiB (S3's smallest part)")
        for name in ("in_flight", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"S3Options: {name}={value!r} must be an int >= 1")
        for name in ("lock_lease_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"S3Options: {name}={value!r} must be a positive number of seconds")


class S3Storage:
    """Run dirs on S3 or an S3-compatible server. One instance is shared per process and settings
    (`S3Storage.shared()`); its client and threads are safe to use from many threads."""

    renames = False
    _shared: dict[tuple, S3Storage] = {}
    _shared_lock = threading.Lock()

    def __init__(self, options: S3Options | None = None, client: Any | None = None):
        self.options = options or S3Options()
        boto3, botocore = _boto()
        self._errors = botocore.exceptions
        if client is None:
            config = botocore.config.Config(
                max_pool_connections=self.options.in_flight + 16,
                retries={"max_attempts": self.options.max_attempts, "mode": "standard"},
                connect_timeout=self.options.timeout_s, read_timeout=self.options.timeout_s,
                # Every file carries its own xxh3 digest, checked on load; skip a second checksum per request.
                request_checksum_calculation="when_required", response_checksum_validation="when_required")
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self._pool = DaemonPool(self.options.in_flight, "ckpt-s3")
        self._slots = threading.BoundedSemaphore(self.options.in_flight)

    @classmethod
    def shared(cls) -> S3Storage:
        """The process's instance for the current AWS settings (a new one when they changed)."""
        key = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                                                "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"))
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls()
            return cls._shared[key]

    # ---- errors --------------------------------------------------------------------------------

    def _call(self, op: str, url: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """One client call, its failures as OSErrors naming the operation and URL (FileNotFoundError for a
        missing object, FileExistsError for a failed condition)."""
        try:
            return fn(**kwargs)
        except self._errors.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if code in _NOT_FOUND:
                raise FileNotFoundError(errno.ENOENT, f"S3 {op}: no such object", url) from None
            if code in _CONFLICT:
                raise FileExistsError(errno.EEXIST, f"S3 {op}: the object exists or changed (condition failed)",
                                      url) from None
            hint = "; create the bucket, or fix the URL" if code == "NoSuchBucket" else ""
            raise OSError(errno.EIO, f"S3 {op} failed: {code}: {err.get('Message', exc)}{hint}", url) from None
        except self._errors.BotoCoreError as exc:
            raise OSError(errno.EIO, f"S3 {op} failed: {exc} (is the S3 endpoint up and reachable? "
                                     "check AWS_ENDPOINT_URL)", url) from None

    # ---- the Storage protocol ------------------------------------------------------------------

    def makedirs(self, path: str) -> None:
        split_url(path)  # prefixes need no creating; a malformed URL is refused here, early

    def fsync_dir(self, path: str) -> None:
        pass  # an object is durable once its PUT (or its multipart upload's completion) returns

    def write_file(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        return _Upload(self, path).run(chunks)

    def write_new(self, path: str, data: bytes) -> None:
        bucket, key = split_url(path)
        self._call("conditional PUT", path, self.client.put_object, Bucket=bucket, Key=key, Body=data,
                   IfNoneMatch="*")

    def replace_file(self, path: str, data: bytes) -> None:
        bucket, key = split_url(path)
        self._call("PUT", path, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def open_read(self, path: str) -> _Reader:
        return _Reader(self, path, self.size(path))

    def size(self, path: str) -> int:
        bucket, key = split_url(path)
        return int(self._call("HEAD", path, self.client.head_object, Bucket=bucket, Key=key)["ContentLength"])

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except FileNotFoundError:
            return self.is_dir(path)

    def is_dir(self, path: str) -> bool:
        bucket, key = split_url(path)
        resp = self._call("LIST", path, self.client.list_objects_v2, Bucket=bucket, Prefix=_dir(key), MaxKeys=1)
        return resp.get("KeyCount", 0) > 0 or bool(self._uploads(path))

    def list_dir(self, path: str) -> list[str]:
        """Names one level below `path`: objects, sub-prefixes, and files still being uploaded (as a local
        folder lists a file being written)."""
        bucket, key = split_url(path)
        names: set[str] = set()
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir(key), Delimiter="/")
        for page in self._call("LIST", path, lambda: list(pages)):
            names.update(p["Prefix"][len(_dir(key)):].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(_dir(key)):] for o in page.get("Contents", []))
        names.update(u_key[len(_dir(key)):].split("/", 1)[0] for u_key, _ in self._uploads(path))
        return sorted(n for n in names if n)

    def rename(self, src: str, dst: str) -> None:
        raise OSError(errno.ENOTSUP, f"object storage has no rename (asked to move it to {dst})", src)

    def remove_file(self, path: str) -> None:
        bucket, key = split_url(path)
        self._call("DELETE", path, self.client.delete_object, Bucket=bucket, Key=key)

    def remove_tree(self, path: str) -> None:
        """Delete the object `path` and everything under it, and abandon uploads in progress there."""
        bucket, key = split_url(path)
        for u_key, upload_id in self._uploads(path):
            self._call("abort upload", path, self.client.abort_multipart_upload, Bucket=bucket, Key=u_key,
                       UploadId=upload_id)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_dir(key))
        keys = [o["Key"] for page in self._call("LIST", path, lambda: list(pages)) for o in page.get("Contents", [])]
        if key:
            keys.append(key)
        for at in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[at: at + 1000]], "Quiet": True}
            resp = self._call("DELETE", path, self.client.delete_objects, Bucket=bucket, Delete=batch)
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise OSError(errno.EIO, f"S3 DELETE failed for {len(resp['Errors'])} objects, first "
                                         f"{first.get('Key')}: {first.get('Code')}: {first.get('Message')}", path)

    # ---- for the lock object (ckpt/io/lease.py) ------------------------------------------------

    def put_conditional(self, path: str, data: bytes, if_match: str | None = None) -> str:
        """Create `path` (or, with `if_match`, replace the version with that ETag); returns the new ETag.
        FileExistsError when the condition fails."""
        bucket, key = split_url(path)
        cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        return self._call("conditional PUT", path, self.client.put_object, Bucket=bucket, Key=key, Body=data,
                          **cond)["ETag"]

    def get_with_age(self, path: str) -> tuple[bytes, str, float]:
        """An object's bytes, ETag, and age in seconds by the server's own clock (no clock skew)."""
        bucket, key = split_url(path)
        resp = self._call("GET", path, self.client.get_object, Bucket=bucket, Key=key)
        data = resp["Body"].read()
        now = _server_time(resp)
        age = (now - resp["LastModified"]).total_seconds() if now is not None else 0.0
        return data, resp["ETag"], age

    def delete_if(self, path: str, etag: str) -> None:
        """Delete `path` only while it is still the version `etag`; FileExistsError otherwise."""
        bucket, key = split_url(path)
        self._call("conditional DELETE", path, self.client.delete_object, Bucket=bucket, Key=key, IfMatch=etag)

    # ---- internals -----------------------------------------------------------------------------

    def _uploads(self, path: str) -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads in progress under `path`."""
        bucket, key = split_url(path)
        resp = self._call("LIST uploads", path, self.client.list_multipart_uploads, Bucket=bucket, Prefix=_dir(key))
        return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", [])]

    def get_range(self, path: str, start: int, view: memoryview) -> None:
        """Fill `view` with the object's bytes from `start` (one ranged GET, received into it slice by slice)."""
        bucket, key = split_url(path)
        resp = self._call("GET", path, self.client.get_object, Bucket=bucket, Key=key,
                          Range=f"bytes={start}-{start + len(view) - 1}")
        body, pos = resp["Body"], 0
        try:
            while pos < len(view):
                n = self._call("GET", path, body.readinto, b=view[pos: pos + _RECV_BYTES])
                if not n:
                    raise OSError(errno.EIO, f"S3 GET ended after {pos} of {len(view)} bytes at offset {start}", path)
                pos += n
        finally:
            body.close()

    def get_ranges(self, path: str, start: int, view: memoryview) -> None:
        """Fill `view` from offset `start` with parallel ranged GETs of part_bytes each."""
        step = self.options.part_bytes
        wait_all(self._pool.submit(lambda at=at: self.get_range(path, start + at, view[at: at + step]))
                  for at in range(0, len(view), step))


def _dir(key: str) -> str:
    return f"{key}/" if key else ""


def _server_time(resp: dict):
    import email.utils

    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date) if date else None


class _Upload:
    """One file written as a multipart upload whose parts go out in parallel (a single PUT when small)."""

    def __init__(self, store: S3Storage, path: str):
        self.store, self.path = store, path
        self.bucket, self.key = split_url(path)
        self.upload_id: str | None = None
        self.parts: list[Future] = []

    def run(self, chunks: Iterable[memoryview | bytes]) -> int:
        part = self.store.options.part_bytes
        buf: bytearray | None = None
        fill = total = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                total += len(view)
                while view:
                    if buf is None:
                        self.store._slots.acquire()  # bounds the bytes buffered in this process
                        buf, fill = bytearray(part), 0
                    n = min(len(view), part - fill)
                    buf[fill: fill + n] = view[:n]
                    fill, view = fill + n, view[n:]
                    if fill == part:
                        self._send(buf)  # the part owns the buffer and its slot from here
                        buf = None
            if buf is not None:
                del buf[fill:]  # the short last part is sent from its own buffer, not a copy of it
            if self.upload_id is None:  # small: one PUT
                try:
                    self.store._call("PUT", self.path, self.store.client.put_object, Bucket=self.bucket,
                                     Key=self.key, Body=buf if buf is not None else b"")
                finally:
                    self._release(buf)
                    buf = None
                return total
            if buf is not None:
                self._send(buf)
                buf = None
            self._complete()
            return total
        except BaseException:
            self._release(buf)
            self._abort()
            raise

    def _release(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.store._slots.release()

    def _send(self, data: bytearray) -> None:
        """Upload one part in the background. Once queued, the part owns `data` and its buffer slot (until then,
        on an error, the caller still does)."""
        number = len(self.parts) + 1
        if number > _MAX_PARTS:
            raise OSError(errno.EFBIG, f"file needs more than {_MAX_PARTS} parts of {len(data)} bytes; raise "
                                       "S3Options.part_bytes", self.path)
        if self.upload_id is None:
            self.upload_id = self.store._call("start upload", self.path, self.store.client.create_multipart_upload,
                                              Bucket=self.bucket, Key=self.key)["UploadId"]
        self.parts.append(self.store._pool.submit(_Part(self, number, data)))

    def _complete(self) -> None:
        parts = wait_all(self.parts)
        self.store._call("complete upload", self.path, self.store.client.complete_multipart_upload,
                         Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts})

    def _abort(self) -> None:
        for f in self.parts:
            f.exception()  # let parts in flight finish before abandoning the upload
        if self.upload_id is not None:
            with contextlib.suppress(OSError):  # else the run dir's next owner aborts it (S3Storage.remove_tree)
                self.store._call("abort upload", self.path, self.store.client.abort_multipart_upload,
                                 Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


class _Part:
    """One part's upload. It lets go of its buffer before it frees the buffer's slot, so the bytes alive in the
    process stay within in_flight buffers."""

    def __init__(self, upload: _Upload, number: int, data: bytearray):
        self.upload, self.number, self.data = upload, number, data

    def __call__(self) -> dict:
        up, data, self.data = self.upload, self.data, None
        try:
            resp = up.store._call("upload part", up.path, up.store.client.upload_part, Bucket=up.bucket, Key=up.key,
                                  UploadId=up.upload_id, PartNumber=self.number, Body=data)
            return {"PartNumber": self.number, "ETag": resp["ETag"]}
        finally:
            del data
            up.store._slots.release()


class _Reader(io.RawIOBase):
    """A read-only file over one object. A read of at least a part goes straight into the caller's memory as
    parallel ranged GETs; smaller ones (headers, small tensors) are served from a window read ahead the same
    way, so a file of many small tensors still costs a few large requests, not one per tensor."""

    def __init__(self, store: S3Storage, path: str, size: int):
        super().__init__()
        self.store, self.path, self.size = store, path, size
        self.name = path
        self._pos = 0
        self._buf, self._buf_at = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        """Up to len(b) bytes from here: what the window holds, else one direct or windowed fetch."""
        view = memoryview(b).cast("B")
        n = min(len(view), self.size - self._pos)
        if n <= 0:
            return 0
        at = self._pos - self._buf_at
        if not 0 <= at < len(self._buf):
            part = self.store.options.part_bytes
            if n >= part:  # large: straight into the caller's memory
                self.store.get_ranges(self.path, self._pos, view[:n])
                self._pos += n
                return n
            want = min(self.size - self._pos, max(_READ_AHEAD, part * 4) if self._pos else _READ_AHEAD)
            buf = bytearray(want)
            self.store.get_ranges(self.path, self._pos, memoryview(buf))
            self._buf, self._buf_at, at = memoryview(buf), self._pos, 0
        n = min(n, len(self._buf) - at)
        view[:n] = self._buf[at: at + n]
        self._pos += n
        return n

    def readinto_parallel(self, b: Any) -> int:
        """Fill as much of `b` as the object holds from here; the byte count."""
        view = memoryview(b).cast("B")
        total = max(0, min(len(view), self.size - self._pos))
        done = 0
        while done < total:
            got = self.readinto(view[done:total])
            if not got:
                break
            done += got
        return done


__all__ = ["S3Options", "S3Storage", "split_url"]
