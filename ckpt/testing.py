"""Fault injection for checkpoint storage, for ckpt's own tests and for users' fault tests of their jobs.

`FaultyStorage` wraps any `Storage` and makes chosen calls fail with an errno, stall, or kill the process
with SIGKILL, on a chosen rank, at the N-th call whose path matches. Because every step of a save goes
through a distinct storage call (tensor files, the last folder fsync before the barrier, the manifest's
temp file, the folder rename, retention's rename and removal), a fault can land in any phase::

    storage = FaultyStorage(faults=[Fault(op="write_file", match=".safetensors", rank=1, error="sigkill")])
    coord = CheckpointCoordinator(run_dir, storage=storage)
"""

from __future__ import annotations

import errno as errno_codes
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from .io.storage import LocalStorage, Storage

# Storage methods a fault can target, plus "fsync": the file's bytes are written, then its fsync fails.
OPS = ("makedirs", "write_file", "fsync", "open_read", "size", "exists", "is_dir", "list_dir", "rename",
       "remove_tree", "remove_file", "fsync_dir", "write_new", "replace_file")
SIGKILL = "sigkill"
_SLEEP = "sleep:"


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Args:
        op: the storage method to hit (see `OPS`); "fsync" hits `write_file` after the bytes are written.
        match: a substring of the call's path ("" matches every path); for `rename`, of "src -> dst".
        rank: the rank it fires on (torch.distributed's rank, else $RANK, else 0); None: every rank.
        error: an errno (OSError naming the path, as the OS would), "sigkill" (the process kills itself),
            or "sleep:S" (the call stalls S seconds, then goes through).
        after: matching calls let through before the fault fires.
        times: how many matching calls it fires on; None: every one after `after`.
        when: "before" the real call, or "after" it. A `write_file` fault "before" leaves a torn file: the
            first half of the bytes, as a crash or a full disk would. Ignored for "fsync" (always after).
    """

    op: str
    match: str = ""
    rank: int | None = None
    error: int | str = errno_codes.EIO
    after: int = 0
    times: int | None = 1
    when: str = "before"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Fault(op={self.op!r}): op must be one of {OPS}")
        if not isinstance(self.match, str):
            raise TypeError(f"Fault(match={self.match!r}): match must be a string (a substring of the path)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise ValueError(f"Fault(rank={self.rank!r}): rank must be a non-negative int, or None for every rank")
        if not _valid_error(self.error):
            raise ValueError(f"Fault(error={self.error!r}): error must be an errno (e.g. errno.ENOSPC), "
                             "'sigkill', or 'sleep:SECONDS'")
        for name in ("after", "times"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"Fault({name}={value!r}): {name} must be a non-negative int"
                                 + (", or None for every call" if name == "times" else ""))
        if self.when not in ("before", "after"):
            raise ValueError(f"Fault(when={self.when!r}): when must be 'before' or 'after'")

    @property
    def sleep_s(self) -> float | None:
        if isinstance(self.error, str) and self.error.startswith(_SLEEP):
            return float(self.error[len(_SLEEP):])
        return None


def _valid_error(error: object) -> bool:
    if isinstance(error, bool):
        return False
    if isinstance(error, int):
        return error > 0
    if error == SIGKILL:
        return True
    if isinstance(error, str) and error.startswith(_SLEEP):
        try:
            return float(error[len(_SLEEP):]) >= 0
        except ValueError:
            return False
    return False


def current_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else $RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class FaultyStorage:
    """A `Storage` that passes every call to `inner` except the ones its faults pick.

    `fired` lists what fired ("op path: error"), so a test can check its fault was reached.
    Thread-safe: a save writes several files at once.
    """

    def __init__(self, inner: Storage | None = None, faults: Sequence[Fault] = ()):
        self.inner: Storage = inner if inner is not None else LocalStorage()
        self.fired: list[str] = []
        self._lock = threading.Lock()
        self.inject(*faults)

    def inject(self, *faults: Fault) -> None:
        """Replace the faults (and their call counts); with none, every call goes through."""
        for f in faults:
            if not isinstance(f, Fault):
                raise TypeError(f"FaultyStorage.inject: {f!r} is not a ckpt.testing.Fault")
        with self._lock:
            self.faults = tuple(faults)
            self._seen = [0] * len(faults)

    def clear(self) -> None:
        self.inject()

    @property
    def renames(self) -> bool:
        return self.inner.renames

    # ---- choosing and firing ----------------------------------------------------------------------

    def _pick(self, op: str, path: str) -> list[Fault]:
        rank = current_rank()
        picked = []
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.op != op or f.match not in path or (f.rank is not None and f.rank != rank):
                    continue
                self._seen[i] += 1
                n = self._seen[i] - f.after  # 1 for the first call that may fire
                if n >= 1 and (f.times is None or n <= f.times):
                    picked.append(f)
                    self.fired.append(f"{op} {path}: {f.error}")
        return picked

    @staticmethod
    def _fire(f: Fault, path: str) -> None:
        if f.sleep_s is not None:
            time.sleep(f.sleep_s)
            return
        if f.error == SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # the signal is delivered asynchronously; never return into the caller
        code = int(f.error)
        raise OSError(code, f"{os.strerror(code)} (injected)", path)

    def _call(self, op: str, path: str, real: Any) -> Any:
        faults = self._pick(op, path)
        for f in faults:
            if f.when == "before":
                self._fire(f, path)
        result = real()
        for f in faults:
            if f.when == "after":
                self._fire(f, path)
        return result

    # ---- the Storage protocol ---------------------------------------------------------------------

    def makedirs(self, path: str) -> None:
        self._call("makedirs", path, lambda: self.inner.makedirs(path))

    def write_file(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        picked = self._pick("write_file", path)
        before = [f for f in picked if f.when == "before"]
        after = [f for f in picked if f.when == "after"] + self._pick("fsync", path)
        for f in before:
            if f.sleep_s is not None:
                self._fire(f, path)
        torn = [f for f in before if f.sleep_s is None]
        if torn:  # half the bytes land, then the failure: what a crash or a full disk mid-write leaves
            data = b"".join(bytes(c) for c in chunks)
            self.inner.write_file(path, [data[: len(data) // 2]])
            self._fire(torn[0], path)
        written = self.inner.write_file(path, chunks)
        for f in after:
            self._fire(f, path)
        return written

    def open_read(self, path: str) -> BinaryIO:
        return self._call("open_read", path, lambda: self.inner.open_read(path))

    def size(self, path: str) -> int:
        return self._call("size", path, lambda: self.inner.size(path))

    def exists(self, path: str) -> bool:
        return self._call("exists", path, lambda: self.inner.exists(path))

    def is_dir(self, path: str) -> bool:
        return self._call("is_dir", path, lambda: self.inner.is_dir(path))

    def list_dir(self, path: str) -> list[str]:
        return self._call("list_dir", path, lambda: self.inner.list_dir(path))

    def write_new(self, path: str, data: bytes) -> None:
        self._call("write_new", path, lambda: self.inner.write_new(path, data))

    def replace_file(self, path: str, data: bytes) -> None:
        self._call("replace_file", path, lambda: self.inner.replace_file(path, data))

    def rename(self, src: str, dst: str) -> None:
        self._call("rename", f"{src} -> {dst}", lambda: self.inner.rename(src, dst))

    def remove_tree(self, path: str) -> None:
        self._call("remove_tree", path, lambda: self.inner.remove_tree(path))

    def remove_file(self, path: str) -> None:
        self._call("remove_file", path, lambda: self.inner.remove_file(path))

    def fsync_dir(self, path: str) -> None:
        self._call("fsync_dir", path, lambda: self.inner.fsync_dir(path))


__all__ = ["OPS", "SIGKILL", "Fault", "FaultyStorage", "current_rank"]
