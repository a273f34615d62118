"""A rank that hangs, or outlives its launcher, exits on its own.

`StepWatchdog` is a daemon thread on every rank, on by default (with or without a recovery policy): the loop
tells it when each training step starts and ends, and a step that has not ended `timeout_s` seconds after it
started (a rank stuck in a collective the others are not in, in data loading, in a dead loop) makes the rank
log which step hung and exit with HEALTH_EXIT_CODE, for `torchrun --max-restarts` to restart the job from its
latest checkpoint. Evaluation and saves are not timed here (the checkpoint coordinator has its own timeout).

Under torchrun the rank also exits when the launcher dies: torch starts the workers in their own session, so
killing `torchrun` alone would leave them training, or hung and holding the run dir's lock. On Linux the
kernel kills the rank with its launcher (PR_SET_PDEATHSIG); elsewhere the watchdog notices the parent change.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .recovery.watchdog import HEALTH_EXIT_CODE

log = logging.getLogger("trainers")

LAUNCHER_GONE_EXIT_CODE = 69  # EX_UNAVAILABLE: nobody is left to restart the job
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def under_launcher() -> bool:
    """Whether this process was started by torchrun (its elastic agent sets these)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (the launcher) dies. Linux only; returns
    whether it was armed. The kernel drops the run dir's lock (a flock) with the process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


def _flush_and_exit(code: int) -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class StepWatchdog:
    """Exits the process when a step runs past `timeout_s` (0: never), or when the parent process changes
    (`watch_parent`). `on_hang(step, elapsed_s)` runs first (it records the event); `exit` is replaceable
    in tests."""

    def __init__(self, rank: int, timeout_s: float, *, watch_parent: bool,
                 on_hang: Callable[[int, float], None] | None = None):
        self.rank, self.timeout_s, self.on_hang = rank, float(timeout_s), on_hang
        self.exit: Callable[[int], None] = _flush_and_exit
        self._parent = os.getppid() if watch_parent else None
        self._step: int | None = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.timeout_s > 0 or self._parent is not None

    def start(self) -> None:
        if self.active and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="trainers-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def arm(self, step: int) -> None:
        """Start timing training step `step` (1-based: the step being computed)."""
        with self._lock:
            self._step, self._since = step, time.monotonic()

    def disarm(self) -> None:
        """The step being timed is over."""
        with self._lock:
            self._step = None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Time training step `step` inside the block."""
        self.arm(step)
        try:
            yield
        finally:
            self.disarm()

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            if self._parent is not None and os.getppid() != self._parent:
                log.error("rank %d: the launcher (pid %d) is gone; exiting with code %d so that nothing of this job "
                          "keeps running or holds the run dir's lock", self.rank, self._parent, LAUNCHER_GONE_EXIT_CODE)
                self.exit(LAUNCHER_GONE_EXIT_CODE)
                return
            with self._lock:
                step, since = self._step, self._since
            elapsed = time.monotonic() - since
            if self.timeout_s > 0 and step is not None and elapsed > self.timeout_s:
                self._hung(step, elapsed)
                return

    def _hung(self, step: int, elapsed: float) -> None:
        log.error("rank %d: step %d has not finished after %.0fs (step_timeout_s=%g): this rank or another is hung "
                  "(in a collective, data loading or a dead loop); exiting with code %d so that torchrun can "
                  "restart the job from its latest checkpoint", self.rank, step, elapsed, self.timeout_s,
                  HEALTH_EXIT_CODE)
        if self.on_hang is not None:
            try:
                self.on_hang(step, elapsed)
            except Exception as exc:
                log.error("rank %d: recording the hang failed: %r", self.rank, exc)
        self.exit(HEALTH_EXIT_CODE)


__all__ = ["LAUNCHER_GONE_EXIT_CODE", "StepWatchdog", "die_with_parent", "under_launcher"]
