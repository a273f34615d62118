"""Talking between ranks during a save or load, on a gloo group of the coordinator's own.

Every step of a save or load is a *phase*: each rank runs its local part, catches what it raises, and
all ranks exchange an outcome. If any rank failed, every rank raises the same error naming the failed
ranks, so nobody is left waiting in a collective. Payloads are plain data packed with msgpack.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import msgpack
import torch
import torch.distributed as dist

from .errors import REMOTE_ERROR_TYPES, CheckpointError, CollectiveTimeoutError

log = logging.getLogger("ckpt")
T = TypeVar("T")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Communicator:
    """Collectives for coordination. Without torch.distributed initialised it is a world of one."""

    def __init__(self, timeout: timedelta):
        self.timeout = timeout
        self.group = None
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # Our own gloo group: coordination never queues behind (or deadlocks with) the training
                # group's nccl work, and it can run from a background thread.
                self.group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            self.rank, self.world_size = 0, 1

    def all_gather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        if self.group is None:
            return [data]
        try:
            size = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(bufs, mine, group=self.group)
        except Exception as exc:
            raise self._collective_error(phase, exc) from exc
        return [bytes(buf[: int(s.item())].numpy()) for buf, s in zip(bufs, sizes, strict=True)]

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        """Every rank's `obj` (msgpack-able plain data), in rank order."""
        return [_unpack(b) for b in self.all_gather_bytes(_pack(obj), phase)]

    def _collective_error(self, phase: str, exc: Exception) -> CheckpointError:
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeoutError(
                f"rank {self.rank}: not every rank reached the '{phase}' step within "
                f"{self.timeout.total_seconds():.0f}s (CheckpointCoordinator(timeout=...)); a rank is hung, "
                f"dead, or did not call the same save/load. Underlying error: {text.splitlines()[0] if text else exc!r}",
                phase=phase,
            )
        return CheckpointError(
            f"rank {self.rank}: lost contact with other ranks during the '{phase}' step ({type(exc).__name__}: "
            f"{text.splitlines()[0] if text else ''}); a rank has probably died"
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
            outcome = {"ok": False, "type": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}"}
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
    cls = REMOTE_ERROR_TYPES.get(types.pop(), CheckpointError) if len(types) == 1 else CheckpointError
    message = f"{what} failed on {where} during '{phase}': {details}"
    try:
        return cls(message, failures=failures)
    except TypeError:  # subclasses with other required fields
        return CheckpointError(message, failures=failures)
