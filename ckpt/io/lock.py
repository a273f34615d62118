"""The run directory's lock: one job's coordinator owns a run dir at a time.

Rank 0 takes an exclusive `flock` on `run_dir/.ckpt.lock` and writes who it is (host, pid, start time) into
the file, for the message another job gets. The kernel drops the lock when the holding process dies,
however it dies, so a crashed job never blocks the next one. Coordinators of the same process share the
lock (it guards against a second *job*, and a process may build a new coordinator for the same run).
The file stays in place after release: removing it could let two processes lock two different files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass

from ..errors import RunDirInUseError
from ..format.layout import LOCK_NAME
from .lease import LeaseLock
from .s3 import S3Storage
from .storage import Storage, is_url

log = logging.getLogger("ckpt")
_taken: dict[str, _Held] = {}  # lock file (real path) -> this process's hold on it
_taken_lock = threading.Lock()


@dataclass
class _Held:
    fd: int
    users: int


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (its details could not be read)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(started {holder.get('started_utc', '?')})")


def _holder_of(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _forget_in_child() -> None:
    """A forked child (a data loader worker, say) must not keep the lock alive after its parent dies."""
    for held in _taken.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _taken.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class RunDirLock:
    """This process's hold on a run dir's lock; `release()` once per successful `acquire()`."""

    def __init__(self, path: str, first: bool):
        self.path = path
        self.first = first  # this hold took the lock; others in this process were already holding it
        self._released = False

    @classmethod
    def acquire(cls, run_dir: str) -> RunDirLock:
        """Lock `run_dir`, or raise RunDirInUseError naming the process that holds it."""
        import fcntl  # POSIX only; imported here so the rest of ckpt imports anywhere

        path = os.path.realpath(os.path.join(run_dir, LOCK_NAME))
        with _taken_lock:
            held = _taken.get(path)
            if held is not None:
                held.users += 1
                return cls(path, first=False)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder_of(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirInUseError(
                    f"run dir {run_dir} is in use by another job's checkpoint coordinator: {_describe(holder)} holds "
                    f"{path}. Stop that job, or use another run dir; if you are sure it is safe, pass "
                    "CheckpointCoordinator(..., force=True) (each commit stays atomic, but the jobs may delete "
                    "each other's checkpoints through retention)", holder=holder, path=path) from None
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            with contextlib.suppress(OSError):  # the lock holds without the note; only others' message is poorer
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
            _taken[path] = _Held(fd, 1)
        return cls(path, first=True)

    def release(self) -> None:
        """Give up this hold; the lock is dropped when the process's last coordinator releases it."""
        if self._released:
            return
        self._released = True
        with _taken_lock:
            held = _taken.get(self.path)
            if held is None:
                return
            held.users -= 1
            if held.users == 0:
                del _taken[self.path]
                os.close(held.fd)  # closing the only descriptor drops the flock


def acquire(storage: Storage, run_dir: str) -> RunDirLock | LeaseLock:
    """The run dir's lock through the means its storage has: a lease object on S3, a flock on a local folder."""
    if isinstance(storage, S3Storage) and is_url(run_dir):
        return LeaseLock.acquire(storage, run_dir, LOCK_NAME)
    return RunDirLock.acquire(run_dir)


def take_run_dir(storage: Storage, run_dir: str, force: bool) -> tuple[str | None, RunDirLock | LeaseLock | None]:
    """Lock `run_dir` for its coordinator. Returns the tag its unfinished-save folders carry and the lock:
    (None, lock) with the lock; with `force=True` and the lock held elsewhere, a tag of its own (so two jobs'
    saves never share a folder) and no lock. A storage with no local folder here (and no lock object) gets
    no lock."""
    if not storage.renames and force:
        raise ValueError(f"CheckpointCoordinator(force=True) is not available on object storage ({run_dir}): with "
                         "no rename, two jobs' saves of one step would write the same objects. Give each job its "
                         "own prefix")
    if not isinstance(storage, S3Storage) and not os.path.isdir(run_dir):
        return None, None
    try:
        return None, acquire(storage, run_dir)
    except RunDirInUseError as exc:
        if not force:
            raise
        log.warning("force=True: %s; going on without the lock", exc)
        return f"p{os.getpid()}-{secrets.token_hex(4)}", None


__all__ = ["RunDirLock", "acquire", "take_run_dir"]
