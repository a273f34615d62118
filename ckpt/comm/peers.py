"""Naming the ranks behind a failed exchange: each rank's arrivals, activity and process, kept in the job's c10d store.

Before each exchange a rank records its arrival (one `set`); it also records its host and pid once, and notes
what it is doing (the file it is writing). When an exchange times out or loses a peer, the survivors read these
records to name the ranks that never arrived (and where they were last seen), and the ranks on their host whose
process is gone. Only used for error messages: every store failure just switches the records off.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import torch.distributed as dist

log = logging.getLogger("ckpt")


def describe_missing(late: dict[int, str], phase: str) -> str:
    if not late:
        return ""
    ranks = sorted(late)
    names = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:16]))
    if len(ranks) > 16:
        names += f" and {len(ranks) - 16} more"
    seen = "; ".join(f"rank {r}: {late[r]}" for r in ranks[:4])
    return f"{names} never reached it (the last step reached: {seen})"


def describe_dead(dead: list[int]) -> str:
    if not dead:
        return ""
    return ("rank " if len(dead) == 1 else "ranks ") + ", ".join(map(str, dead)) + " died (the process is gone)"


def probably_dead(named: str) -> str:
    if not named:
        return ("a rank on another host has probably died (no rank's process here is gone, and the arrival records "
                "name none)")
    return named if "(the process is gone)" in named else named + ", and has probably died"


def dead_peers(peers: dict[int, tuple[str, int]], me: int, skip: set[int] = frozenset(),  # type: ignore[assignment]
               wait_s: float = 2.0) -> list[int]:
    """The ranks on this host whose process is gone (or a zombie), looked at for up to `wait_s` seconds: a
    peer killed mid-exchange closes its sockets as it exits, a moment before its process is reaped. `skip`:
    ranks known to have seen the failure themselves (survivors, which may exit once they raised)."""
    host = socket.gethostname()
    local = [(r, pid) for r, (h, pid) in sorted(peers.items()) if r != me and r not in skip and h == host]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [r for r, pid in local if not _alive(pid)]
        if dead or not local or time.monotonic() >= deadline:
            return dead
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Arrivals:
    """Each rank's latest exchange, kept in the job's c10d store: one key per rank, overwritten each time.

    Only used to name missing ranks in errors, so every store failure just switches it off.
    """

    def __init__(self, store: Any, rank: int):
        self.store, self.rank = store, rank
        self._lock = threading.Lock()  # notes come from the parallel writer threads
        self._set(f"{rank}.who", f"{socket.gethostname()}:{os.getpid()}")  # so a rank that dies can be named

    def _set(self, key: str, value: str) -> None:
        with self._lock:
            if self.store is None:
                return
            try:
                self.store.set(key, value)
            except Exception as exc:
                log.debug("rank %d: record %s failed (%s); switching records off", self.rank, key, exc)
                self.store = None

    def saw_failure(self, seq: int) -> None:
        """Record that this rank saw exchange `seq` fail (so it is a survivor, not the dead one)."""
        self._set(f"{self.rank}.failed", str(seq))

    def saw_it(self, seq: int, world_size: int) -> set[int]:
        """The ranks that recorded seeing exchange `seq` fail."""
        if self.store is None:
            return set()
        try:
            keys = [f"{r}.failed" for r in range(world_size)]
            return {r for r, key in enumerate(keys) if self.store.check([key]) and int(self.store.get(key)) == seq}
        except Exception as exc:
            log.debug("rank %d: could not read failure records (%s)", self.rank, exc)
            return set()

    def peers(self, world_size: int) -> dict[int, tuple[str, int]]:
        """(host, pid) of each rank that recorded it."""
        if self.store is None:
            return {}
        found = {}
        try:
            for r in range(world_size):
                key = f"{r}.who"
                if self.store.check([key]):
                    host, _, pid = self.store.get(key).decode().rpartition(":")
                    found[r] = (host, int(pid))
        except Exception as exc:
            log.debug("rank %d: could not read peer records (%s)", self.rank, exc)
        return found

    @classmethod
    def open(cls, group: Any, rank: int) -> Arrivals | None:
        try:  # private torch API: guarded, and without it errors simply name no ranks
            base = dist.distributed_c10d._get_default_store()
            name = getattr(group, "group_name", None) or dist.distributed_c10d._get_process_group_name(group)
            return cls(dist.PrefixStore(f"ckpt/arrivals/{name}/", base), rank)
        except Exception as exc:
            log.debug("rank %d: no c10d store for arrival records (%s); timeouts will not name ranks", rank, exc)
            return None

    def arrive(self, seq: int, phase: str) -> None:
        try:
            self.store.set(str(self.rank), f"{seq}:{phase}")
        except Exception as exc:
            log.debug("rank %d: arrival record failed (%s); switching it off", self.rank, exc)
            self.store = None

    def note(self, seq: int, activity: str) -> None:
        """What this rank is doing since exchange `seq` (e.g. the file it is writing)."""
        with self._lock:
            if self.store is None:
                return
            try:
                self.store.set(f"{self.rank}.doing", f"{seq}:{activity}")
            except Exception as exc:
                log.debug("rank %d: activity record failed (%s); switching it off", self.rank, exc)
                self.store = None

    def _doing(self, rank: int, since: int) -> str:
        key = f"{rank}.doing"
        if not self.store.check([key]):
            return ""
        noted, _, activity = self.store.get(key).decode().partition(":")
        return f", then was {activity}" if int(noted) == since else ""  # older notes belong to earlier steps

    def missing(self, seq: int, world_size: int) -> dict[int, str]:
        """Ranks whose latest arrival is older than exchange `seq`, with the step they were last seen at."""
        if self.store is None:
            return {}
        late: dict[int, str] = {}
        try:
            for r in range(world_size):
                key = str(r)
                if not self.store.check([key]):
                    late[r] = "none"
                    continue
                last, _, phase = self.store.get(key).decode().partition(":")
                if int(last) < seq:
                    late[r] = f"'{phase}'{self._doing(r, int(last))}"
        except Exception as exc:
            log.debug("rank %d: could not read arrival records (%s)", self.rank, exc)
            return {}
        return late

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.delete_key(str(self.rank))
                self.store.delete_key(f"{self.rank}.doing")
                self.store.delete_key(f"{self.rank}.failed")
                self.store.delete_key(f"{self.rank}.who")
            except Exception as exc:
                log.debug("rank %d: could not remove its arrival record (%s)", self.rank, exc)
            self.store = None
