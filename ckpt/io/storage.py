"""Where the bytes go. A small protocol, and the local filesystem behind it.

Everything durable goes through `write_file` (write, flush, fsync) and `fsync_dir`; a commit is a
`rename` of a fully written directory. Other backends (or a fault-injecting one in tests) implement
the same methods.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Protocol


class Storage(Protocol):
    """The operations a checkpoint needs from a filesystem."""

    def makedirs(self, path: str) -> None: ...

    def write_file(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Write the chunks to a new file at `path`, fsync it, and return the byte count."""
        ...

    def open_read(self, path: str) -> BinaryIO: ...

    def size(self, path: str) -> int: ...

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]: ...

    def rename(self, src: str, dst: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def remove_file(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...


class LocalStorage:
    """A POSIX filesystem (local disk or a shared mount every rank sees)."""

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
