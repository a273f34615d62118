"""Phases: the steps of a save or load, each ending in one exchange of outcomes between all ranks.

Every step of a save or load is a *phase*: each rank runs its local part, catches what it raises, and
the outcome is exchanged. If any rank failed, every rank raises the same error naming the failed ranks,
so nobody is left waiting in a collective. Payloads are plain data, as messages (ckpt/comm/messages.py).
A local part may return `Kept(sent, value)`: `sent` crosses ranks, `value` stays with this rank and comes
back as the phase's `local` (so a phase returns this rank's own result and everyone's, with no out-parameters).

A save or load talks through rank 0, so that what a rank sends and receives does not grow with the world
size: `gather_phase` gathers every rank's result to rank 0, which decides (a plan, a verdict) and sends
every rank the same decision, plus each rank its own part; `broadcast_phase` runs a step on rank 0 alone
and hands every rank its outcome. `run_phase` (every rank gets every rank's result) remains for debugging
steps that need it. Each phase's exchanges, collectives, bytes and seconds are counted (`stats`).

A rank whose exchange times out or loses a peer names the ranks that never arrived, or died, from the
records of ckpt/comm/peers.py. After such a failure the group cannot be trusted to pair the next collectives
correctly, so the communicator refuses to run any more (on the ranks that saw the failure); build a new
coordinator or restart.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import CheckpointError, CollectiveTimeoutError
from .messages import Failure, Outcome, Verdict, combined_failure, decode, encode, pack, unpack
from .peers import Arrivals, dead_peers, describe_dead, describe_missing, probably_dead

log = logging.getLogger("ckpt")
T = TypeVar("T")
_CONNECT_TIMEOUT = timedelta(minutes=10)


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
        self._arrivals: Arrivals | None = None
        self.stats: dict[str, PhaseStats] = {}  # by phase name; see `PhaseStats`, `reset_stats`
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # Our own gloo group: coordination never queues behind (or deadlocks with) the training
                # group's nccl work, and it can run from a background thread.
                # A gloo group's timeout also bounds connecting it, when ranks may arrive far apart; so the
                # group gets a generous one and each exchange waits at most `timeout` on its own.
                self.group = dist.new_group(backend="gloo", timeout=max(timeout, _CONNECT_TIMEOUT))
                self._arrivals = Arrivals.open(self.group, self.rank)
        else:
            self.rank, self.world_size = 0, 1

    # ---- phases --------------------------------------------------------------------------------

    def gather_phase(self, phase: str, local: Callable[[], Any], *, what: str,
                     decide: Callable[[list[Any]], Decision] | None = None) -> Gathered:
        """Run `local` on this rank; rank 0 gathers every rank's result and decides; every rank learns the decision.

        `local` returns plain data (a message's `to_wire()`). Rank 0 calls `decide(results)` (results in rank
        order) and sends its `common` part to every rank and `per_rank[r]` to rank r alone. Without `decide`,
        rank 0 keeps the results. If `local` failed on any rank, or `decide` raised, every rank raises the same
        error (naming the failed ranks). A rank other than 0 sends its result once and receives the decision
        once, so its bytes do not grow with the world size.
        """
        outcome, local_exc, value = self._run_local(phase, local)
        kept: Any = None
        mine: Any = None
        with self._exchange(phase) as stats:
            gathered = self._gather(encode(outcome), stats)
            parts: list[bytes] | None = None
            data: bytes | None = None
            if gathered is not None:
                verdict, parts, kept = self._decide(what, phase, [decode(Outcome, b) for b in gathered], decide)
                data = encode(verdict)
            longest = max((len(p) for p in parts[1:]), default=0) if parts else 0  # rank 0 keeps its own
            received, longest = self._broadcast(data, longest, stats)
            verdict = decode(Verdict, received)
            if verdict.scattered:
                mine = unpack(self._scatter(parts, longest, stats))
        if verdict.failure is not None:
            raise verdict.failure.rebuild() from local_exc
        return Gathered(verdict.common, mine, kept, value)

    def broadcast_phase(self, phase: str, local: Callable[[], Any], *, what: str) -> Gathered:
        """Run `local` on rank 0 only and hand its result (plain data) to every rank as `common`, or raise its
        error on all; rank 0 also gets what `local` kept (`local`)."""
        data: bytes | None = None
        local_exc: Exception | None = None
        value: Any = None
        if self.rank == 0:
            outcome, local_exc, value = self._run_local(phase, local)
            data = encode(Verdict(outcome.result, combined_failure(what, phase, [outcome])))
        with self._exchange(phase) as stats:
            verdict = decode(Verdict, self._broadcast(data, 0, stats)[0])
        if verdict.failure is not None:
            raise verdict.failure.rebuild() from local_exc
        return Gathered(verdict.common, None, None, value)

    def run_phase(self, phase: str, local: Callable[[], T], *, what: str) -> list[T]:
        """Run `local` on this rank, then every rank gets every rank's result (an all-gather); raise on every
        rank if any rank failed. Its bytes grow with the world size on every rank: for start-up and debugging
        steps; a save or load uses `gather_phase` and `broadcast_phase`. `what` names the operation in errors.
        """
        outcome, local_exc, _ = self._run_local(phase, local)
        outcomes = [decode(Outcome, b) for b in self.all_gather_bytes(encode(outcome), phase)]
        failure = combined_failure(what, phase, outcomes)
        if failure is not None:
            raise failure.rebuild() from local_exc
        return [o.result for o in outcomes]

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        """Every rank's `obj` (msgpack-able plain data), in rank order."""
        return [unpack(b) for b in self.all_gather_bytes(pack(obj), phase)]

    def all_gather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        """Every rank's `data`, in rank order (each rank receives all of them)."""
        if self.group is None:
            return [data]
        with self._exchange(phase) as stats:
            longest = self._all_reduce_max([len(data)], stats)[0]
            mine = _padded(data, longest)
            bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
            self._wait(dist.all_gather(bufs, mine, group=self.group, async_op=True))
            stats.collectives += 1
            stats.bytes_sent += (self.world_size - 1) * mine.numel()
            stats.bytes_received += (self.world_size - 1) * mine.numel()
        return [_unpadded(b) for b in bufs]

    @property
    def broken(self) -> bool:
        """Whether an exchange failed on this rank (a timeout, a lost peer): no more exchanges will run."""
        return self._broken is not None

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

    # ---- one exchange ----------------------------------------------------------------------------

    def _run_local(self, phase: str, local: Callable[[], Any]) -> tuple[Outcome, Exception | None, Any]:
        """This rank's outcome to send, what it raised, and what it keeps (a `Kept`'s value)."""
        try:
            result = local()
        except Exception as exc:
            log.debug("rank %d failed in %s:\n%s", self.rank, phase, traceback.format_exc())
            return Outcome(failure=Failure.of(exc)), exc, None
        if isinstance(result, Kept):
            return Outcome(result.sent), None, result.value
        return Outcome(result), None, None

    def _decide(self, what: str, phase: str, outcomes: list[Outcome], decide: Callable[[list[Any]], Decision] | None
                ) -> tuple[Verdict, list[bytes] | None, Any]:
        """Rank 0: the verdict for every rank, the parts to scatter, and what rank 0 keeps."""
        failure = combined_failure(what, phase, outcomes)
        if failure is not None:
            return Verdict(failure=failure), None, None
        results = [o.result for o in outcomes]
        if decide is None:
            return Verdict(), None, results
        try:
            decision = decide(results)
            if decision.per_rank is not None and len(decision.per_rank) != self.world_size:
                raise CheckpointError(f"internal error in '{phase}': {len(decision.per_rank)} parts for "
                                      f"{self.world_size} ranks; please report this")
        except Exception as exc:  # the same error on every rank, as if each had decided itself
            log.debug("rank 0: deciding %s failed:\n%s", phase, traceback.format_exc())
            return Verdict(failure=Failure.of(exc)), None, None
        if decision.per_rank is None:
            return Verdict(decision.common), None, decision.kept
        return Verdict(decision.common, scattered=True), [pack(p) for p in decision.per_rank], decision.kept

    @contextmanager
    def _exchange(self, phase: str) -> Iterator[PhaseStats]:
        """One numbered exchange: arrival recorded, counted and timed; a collective failure becomes an error
        naming the missing ranks, and breaks this communicator."""
        stats = self.stats.setdefault(phase, PhaseStats())
        if self.group is None:
            yield stats
            return
        if self._broken is not None:
            raise CheckpointError(
                f"rank {self.rank}: cannot run the '{phase}' step: an earlier step failed ({self._broken}), so this "
                "coordinator's collectives may no longer pair up across ranks. Restart the job (torchrun "
                "--max-restarts does this), or build a new CheckpointCoordinator on every rank")
        self._seq += 1
        if self._arrivals is not None:
            self._arrivals.arrive(self._seq, phase)
        stats.exchanges += 1
        started = time.perf_counter()
        try:
            yield stats
        except Exception as exc:
            error = self._collective_error(phase, exc)
            self._broken = f"'{phase}': {error}"
            raise error from exc
        finally:
            stats.seconds += time.perf_counter() - started

    def _wait(self, work: Any) -> None:
        work.wait(timeout=self.timeout)

    def _all_reduce_max(self, values: list[int], stats: PhaseStats) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        self._wait(dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        stats.collectives += 1
        stats.bytes_sent += tensor.numel() * 8
        stats.bytes_received += tensor.numel() * 8
        return tensor.tolist()

    def _gather(self, data: bytes, stats: PhaseStats) -> list[bytes] | None:
        """Every rank's `data` on rank 0 (None elsewhere)."""
        if self.group is None:
            return [data]
        # Rank 0 keeps its own data: the others pad only to the longest of theirs (rank 0's may be far longer,
        # e.g. the tensor sizes of a replicated component it plans).
        outgoing = b"" if self.rank == 0 else data
        longest = self._all_reduce_max([len(outgoing)], stats)[0]
        mine = _padded(outgoing, longest)
        bufs = [torch.empty_like(mine) for _ in range(self.world_size)] if self.rank == 0 else None
        self._wait(dist.gather(mine, gather_list=bufs, dst=0, group=self.group, async_op=True))
        stats.collectives += 1
        if bufs is None:
            stats.bytes_sent += mine.numel()
            return None
        stats.bytes_received += (self.world_size - 1) * mine.numel()
        return [data, *(_unpadded(b) for b in bufs[1:])]

    def _broadcast(self, data: bytes | None, extra: int, stats: PhaseStats) -> tuple[bytes, int]:
        """Rank 0's `data` and `extra` (a number) on every rank."""
        if self.group is None:
            return data or b"", extra
        header = torch.tensor([len(data) if data is not None else 0, extra], dtype=torch.int64)
        self._wait(dist.broadcast(header, src=0, group=self.group, async_op=True))
        size, extra = header.tolist()
        buf = _padded(data, size) if data is not None else torch.empty(8 + size, dtype=torch.uint8)
        self._wait(dist.broadcast(buf, src=0, group=self.group, async_op=True))
        stats.collectives += 2
        if self.rank == 0:
            stats.bytes_sent += (self.world_size - 1) * (16 + buf.numel())
        else:
            stats.bytes_received += 16 + buf.numel()
        return _unpadded(buf), extra

    def _scatter(self, parts: list[bytes] | None, longest: int, stats: PhaseStats) -> bytes:
        """Rank r gets `parts[r]` from rank 0; `longest` is the longest part but rank 0's (known to every rank)."""
        if self.group is None:
            return parts[0] if parts else b""
        buf = torch.empty(8 + longest, dtype=torch.uint8)
        bufs = None
        if self.rank == 0 and parts is not None:  # rank 0 keeps its own part; `longest` is the others' longest
            bufs = [_padded(b"", longest), *(_padded(p, longest) for p in parts[1:])]
        self._wait(dist.scatter(buf, scatter_list=bufs, src=0, group=self.group, async_op=True))
        stats.collectives += 1
        if self.rank == 0:
            stats.bytes_sent += (self.world_size - 1) * buf.numel()
            return parts[0] if parts else b""
        stats.bytes_received += buf.numel()
        return _unpadded(buf)

    def _collective_error(self, phase: str, exc: Exception) -> CheckpointError:
        text = str(exc)
        underlying = f"{type(exc).__name__}: {_first_sentence(text) or repr(exc)}"
        if self._arrivals is not None:  # before anything else: a survivor that exits is not named as dead
            self._arrivals.saw_failure(self._seq)
        late = self._arrivals.missing(self._seq, self.world_size) if self._arrivals is not None else {}
        late.pop(self.rank, None)
        named = describe_missing(late, phase)
        why = {r: f"did not reach the '{phase}' step (the last step it reached: {seen})" for r, seen in late.items()}
        # A rank that died inside the exchange arrived like the others: only its gone process names it.
        if self._arrivals is not None:
            saw = self._arrivals.saw_it(self._seq, self.world_size)
            dead = dead_peers(self._arrivals.peers(self.world_size), self.rank, skip=saw | set(late),
                              wait_s=0.5 if late else 2.0)
        else:
            dead = []
        if dead:
            why.update({r: f"died during the '{phase}' step (its process is gone)" for r in dead})
            late.update(dict.fromkeys(dead, f"'{phase}'"))
            named = "; ".join(filter(None, [named, describe_dead(dead)]))
        if "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeoutError(
                f"rank {self.rank}: timed out after {self.timeout.total_seconds():.0f}s at the '{phase}' step "
                f"(CheckpointCoordinator(timeout=...)): {named or 'not every rank reached it'}. A rank is hung, "
                f"dead, or did not call the same save/load. ({underlying})",
                phase=phase, missing_ranks=sorted(late) if late else None,
            )
        return CheckpointError(
            f"rank {self.rank}: lost contact with other ranks during the '{phase}' step: "
            f"{probably_dead(named)}. ({underlying})", failures=why)


@dataclass(frozen=True)
class Decision:
    """What rank 0 decided from every rank's result in a `gather_phase` (all plain data)."""

    common: Any = None  # sent to every rank
    per_rank: Sequence[Any] | None = None  # one part per rank, each sent to its rank alone
    kept: Any = None  # stays on rank 0


@dataclass(frozen=True)
class Gathered:
    """What a `gather_phase` (or `broadcast_phase`) returns on this rank."""

    common: Any  # rank 0's decision, the same on every rank
    mine: Any  # this rank's part of the decision (None when none was sent)
    kept: Any  # rank 0: what it kept (every rank's result without `decide`); None elsewhere
    local: Any = None  # what this rank's local part kept for itself (`Kept.value`)


@dataclass(frozen=True)
class Kept:
    """A local part's result in two: `sent` (plain data) crosses ranks, `value` stays on this rank."""

    sent: Any
    value: Any


def _padded(data: bytes, longest: int) -> torch.Tensor:
    """`data` behind its 8-byte length, padded to 8 + `longest` bytes (collectives move equal sizes)."""
    buf = torch.zeros(8 + longest, dtype=torch.uint8)
    buf[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    if data:
        buf[8: 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _unpadded(buf: torch.Tensor) -> bytes:
    raw = buf.numpy().tobytes()
    return raw[8: 8 + int.from_bytes(raw[:8], "little")]


def _first_sentence(text: str) -> str:
    """The gist of a backend error: its first line, without gloo's generic advice."""
    first = text.splitlines()[0] if text else ""
    return first.split(". This is typically")[0]
