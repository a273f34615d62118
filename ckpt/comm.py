"""Talking between ranks during a save or load, on a gloo group of the coordinator's own.

Every step of a save or load is a *phase*: each rank runs its local part, catches what it raises, and
all ranks exchange an outcome. If any rank failed, every rank raises the same error naming the failed
ranks, so nobody is left waiting in a collective. Payloads are plain data packed with msgpack.

Before each exchange a rank records its arrival in the job's c10d store (one `set`), so a rank whose
exchange times out or loses a peer can name the ranks that never arrived, and where they were last seen.
After such a failure the group cannot be trusted to pair the next collectives correctly, so the
communicator refuses to run any more (on the ranks that saw the failure); build a new coordinator or restart.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import msgpack
import torch
import torch.distributed as dist

from .errors import REMOTE_ERROR_TYPES, CheckpointError, CollectiveTimeoutError

log = logging.getLogger("ckpt")
T = TypeVar("T")
_CONNECT_TIMEOUT = timedelta(minutes=10)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class PhaseStats:
    """What one phase cost this rank so far: exchanges, collective calls, payload bytes and seconds.

    Bytes are the logical payload: `sent` counts this rank's bytes once per rank they are delivered to,
    `received` the bytes delivered to this rank by the others (an all-gather of m bytes each: (W-1)*m both ways;
    a broadcast of m: (W-1)*m sent by the root, m received by each other rank). Always on: a few additions
    per collective.
    """

    exchanges: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def to_plain(self) -> dict[str, int | float]:
        return {"exchanges": self.exchanges, "collectives": self.collectives, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "seconds": self.seconds}


class Communicator:
    """Collectives for coordination. Without torch.distributed initialised it is a world of one."""

    def __init__(self, timeout: timedelta):
        self.timeout = timeout
        self.group = None
        self._seq = 0  # exchanges so far; the same on every rank, since all take the same path
        self._broken: str | None = None  # why this rank can no longer take part in exchanges
        self._arrivals: _Arrivals | None = None
        self.stats: dict[str, PhaseStats] = {}  # by phase name; see `PhaseStats`, `reset_stats`
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # Our own gloo group: coordination never queues behind (or deadlocks with) the training
                # group's nccl work, and it can run from a background thread.
                # A gloo group's timeout also bounds connecting it, when ranks may arrive far apart; so the
                # group gets a generous one and each exchange waits at most `timeout` on its own.
                self.group = dist.new_group(backend="gloo", timeout=max(timeout, _CONNECT_TIMEOUT))
                self._arrivals = _Arrivals.open(self.group, self.rank)
        else:
            self.rank, self.world_size = 0, 1

    def all_gather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        if self.group is None:
            return [data]
        if self._broken is not None:
            raise CheckpointError(
                f"rank {self.rank}: cannot run the '{phase}' step: an earlier step failed ({self._broken}), so this "
                "coordinator's collectives may no longer pair up across ranks. Restart the job (torchrun "
                "--max-restarts does this), or build a new CheckpointCoordinator on every rank")
        self._seq += 1
        if self._arrivals is not None:
            self._arrivals.arrive(self._seq, phase)
        stats = self.stats.setdefault(phase, PhaseStats())
        stats.exchanges += 1
        started = time.perf_counter()
        try:
            size = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group, async_op=True).wait(timeout=self.timeout)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(bufs, mine, group=self.group, async_op=True).wait(timeout=self.timeout)
        except Exception as exc:
            error = self._collective_error(phase, exc)
            self._broken = f"'{phase}': {error}"
            raise error from exc
        finally:
            stats.seconds += time.perf_counter() - started
        others = self.world_size - 1
        stats.collectives += 2
        stats.bytes_sent += others * (8 + mine.numel())
        stats.bytes_received += others * (8 + mine.numel())
        return [bytes(buf[: int(s.item())].numpy()) for buf, s in zip(bufs, sizes, strict=True)]

    @property
    def broken(self) -> bool:
        """Whether an exchange failed on this rank (a timeout, a lost peer): no more exchanges will run."""
        return self._broken is not None

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        """Every rank's `obj` (msgpack-able plain data), in rank order."""
        return [_unpack(b) for b in self.all_gather_bytes(_pack(obj), phase)]

    def reset_stats(self) -> dict[str, PhaseStats]:
        """Return the counters so far (by phase) and start new ones."""
        stats, self.stats = self.stats, {}
        return stats

    def note(self, activity: str) -> None:
        """Record what this rank is doing between exchanges, so a timeout on the others can name it."""
        if self._arrivals is not None:
            self._arrivals.note(self._seq, activity)

    def close(self) -> None:
        """Forget this rank's arrival record in the store (the group itself is left to torch)."""
        if self._arrivals is not None:
            self._arrivals.close()
            self._arrivals = None

    def _collective_error(self, phase: str, exc: Exception) -> CheckpointError:
        text = str(exc)
        underlying = f"{type(exc).__name__}: {_first_sentence(text) or repr(exc)}"
        late = self._arrivals.missing(self._seq, self.world_size) if self._arrivals is not None else {}
        late.pop(self.rank, None)
        named = _describe_missing(late, phase)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeoutError(
                f"rank {self.rank}: timed out after {self.timeout.total_seconds():.0f}s at the '{phase}' step "
                f"(CheckpointCoordinator(timeout=...)): {named or 'not every rank reached it'}. A rank is hung, "
                f"dead, or did not call the same save/load. ({underlying})",
                phase=phase, missing_ranks=sorted(late) if late else None,
            )
        return CheckpointError(
            f"rank {self.rank}: lost contact with other ranks during the '{phase}' step: "
            f"{named + ', and has probably died' if named else 'a rank has probably died'}. ({underlying})",
            failures={r: f"did not reach the '{phase}' step (the last step it reached: {seen})"
                      for r, seen in late.items()},
        )

    def run_phase(self, phase: str, local: Callable[[], T], *, what: str) -> list[T]:
        """Run `local` on this rank, then exchange outcomes; raise on every rank if any rank failed.

        Returns every rank's result in rank order. `what` names the operation in error messages.
        """
        result: Any = None
        outcome: dict[str, Any]
        try:
            result = local()
            outcome = {"ok": True, "result": result}
        except Exception as exc:
            log.debug("rank %d failed in %s:\n%s", self.rank, phase, traceback.format_exc())
            outcome = {"ok": False, "type": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}",
                       "fields": error_fields(exc)}
            local_exc: Exception | None = exc
        else:
            local_exc = None
        outcomes = self.all_gather(outcome, phase)
        failures = {rank: o["error"] for rank, o in enumerate(outcomes) if not o["ok"]}
        if failures:
            raise _combined_error(what, phase, failures, outcomes) from local_exc
        return [o["result"] for o in outcomes]


def _combined_error(what: str, phase: str, failures: dict[int, str], outcomes: list[dict]) -> CheckpointError:
    ranks = sorted(failures)
    where = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    details = "; ".join(f"rank {r}: {failures[r]}" for r in ranks[:8])
    if len(ranks) > 8:
        details += f"; ... and {len(ranks) - 8} more"
    types = {outcomes[r].get("type") for r in ranks}
    message = f"{what} failed on {where} during '{phase}': {details}"
    if len(types) > 1:
        return CheckpointError(message, failures=failures)  # mixed failures: no one rank's fields describe them
    cls = REMOTE_ERROR_TYPES.get(types.pop(), CheckpointError)
    # The structured fields (component, path, key_path, ...) are the lowest failed rank's, as its message is first.
    fields = _init_fields(cls, outcomes[ranks[0]].get("fields") or {})
    try:
        return cls(message, failures=failures, **fields)
    except TypeError:  # subclasses with other required fields
        return CheckpointError(message, failures=failures, path=fields.get("path"))


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception's structured fields (component, path, key_path, ...) that can cross ranks as plain data."""
    return {name: value for name, value in vars(exc).items()
            if not name.startswith("_") and name != "failures" and _is_plain(value)}


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | str | bytes | float):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if depth > 4:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _init_fields(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields `cls(message, ...)` takes by keyword (an error rebuilt on another rank gets the same ones)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    accepted = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    accepted -= {"message", "failures"}
    return {n: v for n, v in fields.items() if n in accepted}


def _describe_missing(late: dict[int, str], phase: str) -> str:
    if not late:
        return ""
    ranks = sorted(late)
    names = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:16]))
    if len(ranks) > 16:
        names += f" and {len(ranks) - 16} more"
    seen = "; ".join(f"rank {r}: {late[r]}" for r in ranks[:4])
    return f"{names} never reached it (the last step reached: {seen})"


def _first_sentence(text: str) -> str:
    """The gist of a backend error: its first line, without gloo's generic advice."""
    first = text.splitlines()[0] if text else ""
    return first.split(". This is typically")[0]


class _Arrivals:
    """Each rank's latest exchange, kept in the job's c10d store: one key per rank, overwritten each time.

    Only used to name missing ranks in errors, so every store failure just switches it off.
    """

    def __init__(self, store: Any, rank: int):
        self.store, self.rank = store, rank
        self._lock = threading.Lock()  # notes come from the parallel writer threads

    @classmethod
    def open(cls, group: Any, rank: int) -> _Arrivals | None:
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
            except Exception as exc:
                log.debug("rank %d: could not remove its arrival record (%s)", self.rank, exc)
            self.store = None
