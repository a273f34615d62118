"""Liveness of the ranks: a gloo group with a short timeout for the per-step agreement, and checks that
name the ranks that did not answer (torch's monitored barrier).

A check runs between steps every `health_check_interval` steps. The per-step agreement of the recovery
flags runs on the same short timeout, so a rank stuck inside a step (in a collective the others are not
in, in data loading, in a dead loop) is noticed at that step. Either way the caller records the event and
exits with HEALTH_EXIT_CODE, for `torchrun --max-restarts` to restart the job from its latest checkpoint.
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch
import torch.distributed as dist

HEALTH_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", which is what a restart does
FOLLOW_UP_S = 5.0  # the check that names the missing ranks after a timed-out agreement waits at most this
# The groups' own timeout also bounds connecting them, when ranks may arrive far apart (a restart under load):
# keep it long, and time each operation out on its own.
GROUP_TIMEOUT = timedelta(minutes=30)
_FAILED_RANKS = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


class HealthCheckFailure(RuntimeError):
    """Some rank did not answer in time. `missing`: the ranks known not to have answered (rank 0 knows them
    all; another rank only knows that rank 0 did not release it)."""

    def __init__(self, message: str, *, missing: tuple[int, ...], during: str, cause: str = ""):
        super().__init__(message)
        self.missing, self.during, self.cause = missing, during, cause


def _first_line(exc: BaseException) -> str:
    """An error's first line without gloo's source-location prefix, cut to a readable length."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
    return re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]


class HealthWatchdog:
    """Collective on construction (it creates two gloo groups): build it on every rank at the same point."""

    def __init__(self, rank: int, world_size: int, interval: int, timeout_s: float):
        self.rank, self.world_size, self.interval, self.timeout_s = rank, world_size, interval, timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        # After the agreement timed out, the live ranks reach the check within about a step of each other:
        # waiting the full timeout again would double the time to notice a hang.
        self.follow_up_s = min(FOLLOW_UP_S, max(1.0, float(timeout_s) / 2))
        self.group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)  # the per-step agreement
        self.probe_group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)  # checks, untouched by a failure

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def all_reduce(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `values` over the ranks; on a timeout or a lost peer, find out who is missing and raise."""
        try:
            dist.all_reduce(values, group=self.group, async_op=True).wait(timeout=self.timeout)
            return values
        except Exception as exc:
            first = _first_line(exc)
            self.check(during=what, cause=first, timeout_s=self.follow_up_s)
            # Everyone answered the check: the agreement failed for another reason; the group is unusable anyway.
            raise HealthCheckFailure(f"rank {self.rank}: the {what} failed ({first}), yet every rank answered the "
                                     "check after it", missing=(), during=what, cause=first) from exc

    def check(self, during: str = "health check", cause: str = "", timeout_s: float | None = None) -> None:
        """Every rank must reach this within the timeout (`timeout_s`, default the watchdog's); raises
        HealthCheckFailure naming the missing ranks."""
        waited = self.timeout_s if timeout_s is None else timeout_s
        try:
            dist.monitored_barrier(group=self.probe_group, timeout=timedelta(seconds=waited), wait_all_ranks=True)
        except Exception as exc:
            text = str(exc)
            found = _FAILED_RANKS.search(text)
            if found:
                missing = tuple(int(r) for r in found.group(1).replace(" ", "").split(",") if r)
                message = (f"ranks {list(missing)} did not answer the {during} within {self.timeout_s:g}s "
                           "(hung or dead)")
            elif self.rank == 0:
                missing, message = (), f"the {during} failed on rank 0: {_first_line(exc)}"
            else:
                missing = ()
                message = (f"rank 0 did not release the {during} within {self.timeout_s:g}s: rank 0 is hung or dead, "
                           "or it found other ranks missing (its event names them)")
            raise HealthCheckFailure(message, missing=missing, during=during, cause=cause or _first_line(exc)) from exc
