"""The run dir's lock on object storage: an object taken with a conditional put, held by a lease.

There is no flock on S3, and no kernel to drop a dead process's lock. Rank 0 creates `prefix/.ckpt.lock`
with `If-None-Match: *` (so of two jobs starting at once exactly one succeeds), writing who it is and its lease.
A thread renews it every third of the lease with `If-Match` on its own ETag; a job that died stops renewing,
and once the object is older than its lease by the server's own clock, the next job takes it over, again by a
conditional put on the stale ETag (of two jobs taking over at once, one wins). Release deletes it, only if it
is still ours. Coordinators of the same process share one hold, as with the local lock (ckpt/io/lock.py).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading

from ..errors import RunDirInUseError
from .s3 import S3Storage

log = logging.getLogger("ckpt")


class _Lease:
    """This process's lock object: its ETag, and the thread that renews it."""

    def __init__(self, storage: S3Storage, path: str, etag: str, body: bytes):
        self.storage, self.path, self.etag, self.body = storage, path, etag, body
        self.users = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="ckpt-s3-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        every = self.storage.options.lock_lease_s / 3
        while not self._stop.wait(every):
            try:
                self.etag = self.storage.put_conditional(self.path, self.body, if_match=self.etag)
            except FileExistsError:
                log.error("lost the run dir's lock %s: another job took it over (this job did not renew it within "
                          "its lease of %.0fs); stop one of the two jobs", self.path, self.storage.options.lock_lease_s)
                return
            except OSError as exc:  # the server may come back before the lease runs out
                log.warning("could not renew the run dir's lock %s (will retry): %s", self.path, exc)

    def drop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.storage.delete_if(self.path, self.etag)
        except OSError as exc:  # taken over, or unreachable: it expires on its own
            log.warning("could not remove the run dir's lock %s: %s", self.path, exc)


_taken: dict[str, _Lease] = {}
_taken_lock = threading.Lock()


def _forget_in_child() -> None:
    _taken.clear()  # a forked child has no renewing thread and must not release its parent's lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _describe(holder: dict, age: float) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
            f"{holder.get('started_utc', '?')}; lease renewed {age:.0f}s ago, valid for {holder.get('lease_s', '?')}s)")


class LeaseLock:
    """This process's hold on an object-storage run dir's lock; `release()` once per successful `acquire()`."""

    def __init__(self, path: str, first: bool):
        self.path = path
        self.first = first
        self._released = False

    @classmethod
    def acquire(cls, storage: S3Storage, run_dir: str, lock_name: str) -> LeaseLock:
        """Take the lock object, or raise RunDirInUseError naming the job whose lease is live."""
        path = f"{run_dir.rstrip('/')}/{lock_name}"
        with _taken_lock:
            held = _taken.get(path)
            if held is not None:
                held.users += 1
                return cls(path, first=False)
            body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               "lease_s": storage.options.lock_lease_s}).encode()
            _taken[path] = _Lease(storage, path, _take(storage, path, body, run_dir), body)
        return cls(path, first=True)

    def release(self) -> None:
        """Give up this hold; the lock object is deleted when the process's last coordinator releases it."""
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
                held.drop()


def _take(storage: S3Storage, path: str, body: bytes, run_dir: str) -> str:
    """Create the lock object, or take over one whose lease ran out; its new ETag."""
    for _ in range(3):  # the holder may release between our put and our read
        try:
            return storage.put_conditional(path, body)
        except FileExistsError:
            pass
        try:
            data, etag, age = storage.get_with_age(path)
        except FileNotFoundError:
            continue
        holder: dict = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(data)
            holder = parsed if isinstance(parsed, dict) else {}
        lease = holder.get("lease_s")
        lease = float(lease) if isinstance(lease, int | float) else storage.options.lock_lease_s
        if age <= lease:
            raise RunDirInUseError(
                f"run dir {run_dir} is in use by another job's checkpoint coordinator: {_describe(holder, age)} holds "
                f"{path}. Stop that job, or use another run dir; a lock of a job that died expires {lease:.0f}s after "
                "its last renewal", holder=holder, path=path)
        try:
            new = storage.put_conditional(path, body, if_match=etag)
        except FileExistsError:
            continue  # another job took it over first; the next round names it
        log.warning("took over the run dir's lock %s: its lease ran out %.0fs ago (%s died or hung)", path,
                    age - lease, f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}")
        return new
    raise RunDirInUseError(f"run dir {run_dir}: could not take its lock {path}: other jobs keep taking it; "
                           "make sure only one job uses this run dir", path=path)


__all__ = ["LeaseLock"]
