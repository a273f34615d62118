"""Where the bytes go. A small protocol, the local filesystem behind it, and the choice of backend by URL.

Everything durable goes through `write_file` (write, flush, fsync) and `fsync_dir`. On a store that
`renames` (the local filesystem) a commit is a `rename` of a fully written directory; on one that does not
(object storage, ckpt/io/s3.py) the commit is the create-only `write_new` of the manifest. Other backends (or a
fault-injecting one in tests) implement the same methods. `storage_for(path)` picks the backend a run dir needs:
`s3://bucket/prefix` gets S3Storage, anything else the local filesystem.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Protocol

from .s3 import S3Storage  # boto3 itself is imported only when an s3:// path is used


class Storage(Protocol):
    """The operations a checkpoint needs from a filesystem or an object store."""

    # Whether `rename` moves a folder atomically. Without it a save writes in place and commits by `write_new`.
    renames: bool
    # Optional (default False): reading a file twice costs no more than reading it once (a local page cache),
    # and the store has `identity(path)`, a value that changes whenever the file is replaced or rewritten.
    # Then a load verifies every file before it reads tensors straight into the live state; else it reads
    # each file once, into new tensors, and copies them into the live state after the check.

    def makedirs(self, path: str) -> None: ...

    def write_file(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Write the chunks to a new file at `path`, fsync it, and return the byte count."""
        ...

    def open_read(self, path: str) -> BinaryIO: ...

    def size(self, path: str) -> int: ...

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]: ...

    def write_new(self, path: str, data: bytes) -> None:
        """Create `path` holding `data`, durably, in one step; FileExistsError if it already exists."""
        ...

    def replace_file(self, path: str, data: bytes) -> None:
        """Make `path` hold `data`: readers see the old bytes or the new ones, never a mix."""
        ...

    def rename(self, src: str, dst: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def remove_file(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...


class LocalStorage:
    """A POSIX filesystem (local disk or a shared mount every rank sees)."""

    renames = True
    # A second read of a file costs no transfer (the page cache serves it), so a load checks every file
    # first and then reads the bytes straight into the live tensors (ckpt/load/loading.py VerifiedCopy).
    rereads_are_cheap = True

    def identity(self, path: str) -> tuple[int, ...]:
        """What changes when the file at `path` is replaced or rewritten: device, inode, size, change time."""
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def write_file(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        written = 0
        with _naming(path), open(path, "wb", buffering=0) as f:
            for chunk in chunks:
                written += _write_all(f, chunk)
            os.fsync(f.fileno())
        return written

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb", buffering=0)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def write_new(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.new"
        self.write_file(tmp, [data])
        try:
            os.link(tmp, path)  # unlike rename, link refuses an existing target
        finally:
            self.remove_file(tmp)
        self.fsync_dir(os.path.dirname(path) or ".")

    def replace_file(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        self.write_file(tmp, [data])
        os.replace(tmp, path)
        self.fsync_dir(os.path.dirname(path) or ".")

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def remove_tree(self, path: str) -> None:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            with _naming(path):
                os.fsync(fd)
        finally:
            os.close(fd)


URL_SCHEME = "s3://"


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage (`s3://bucket/prefix`) rather than a local folder."""
    return isinstance(path, str) and path.startswith(URL_SCHEME)


def norm_path(path: str | os.PathLike) -> str:
    """One spelling per location, for comparing paths: absolute and normalised locally; for a URL, the
    prefix with repeated and trailing slashes and `.` segments removed (`..` is kept, so it is never equal to
    a path inside the run)."""
    path = os.fspath(path)
    if not is_url(path):
        return os.path.normpath(os.path.abspath(path))
    parts = [p for p in path[len(URL_SCHEME):].split("/") if p not in ("", ".")]
    return URL_SCHEME + "/".join(parts)


def resolved(path: str) -> str:
    """Where `path` really leads: symlinks resolved locally; for a URL, `.` and `..` segments applied."""
    if not is_url(path):
        return os.path.realpath(path)
    return URL_SCHEME + posixpath.normpath("/" + path[len(URL_SCHEME):]).lstrip("/")


def is_inside(root: str, path: str) -> bool:
    """Whether `path` really leads to `root` or somewhere under it (a symlink or `..` can lead out)."""
    real_root, real = resolved(root), resolved(path)
    if is_url(root):
        return real == real_root or real.startswith(real_root.rstrip("/") + "/")
    return os.path.commonpath([real_root, real]) == real_root


def parent_of(path: str) -> str:
    """The folder holding `path` (a URL's parent prefix, or a local parent folder)."""
    return os.path.dirname(norm_path(path)) if is_url(path) else os.path.dirname(os.path.abspath(path))


def storage_for(path: str | os.PathLike, storage: Storage | None = None) -> Storage:
    """`storage` when given, else the backend `path` needs: S3Storage for `s3://` (the `ckpt[s3]` extra),
    the local filesystem otherwise."""
    if storage is not None:
        return storage
    if is_url(os.fspath(path)):
        return S3Storage.shared()
    return LocalStorage()


def walk_files(storage: Storage, root: str) -> list[str]:
    """Every file under `root`, as `/`-separated paths relative to it."""
    if not is_url(root):
        return [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/")
                for folder, _, names in os.walk(root) for n in names]
    out = []
    for name in storage.list_dir(root):
        path = f"{root.rstrip('/')}/{name}"
        out += [f"{name}/{sub}" for sub in walk_files(storage, path)] if storage.is_dir(path) else [name]
    return out


def tree_bytes(storage: Storage, root: str) -> int:
    """The bytes of every file under `root` (what is left of an unfinished save, say)."""
    total = 0
    for rel in walk_files(storage, root):
        with contextlib.suppress(FileNotFoundError):  # a file still being uploaded has no size yet
            total += storage.size(f"{root.rstrip('/')}/{rel}" if is_url(root) else os.path.join(root, rel))
    return total


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Give OSErrors from write()/fsync(), which carry no file name, the path they happened on."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def _write_all(f: BinaryIO, chunk: memoryview | bytes) -> int:
    view = memoryview(chunk).cast("B")
    total = len(view)
    while view:
        n = f.write(view)
        if n is None or n <= 0:
            raise OSError(f"short write to {f.name!r}")
        view = view[n:]
    return total
