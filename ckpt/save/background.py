"""A save's write-and-commit work running on a thread of its own, and the handle an async save returns."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("ckpt")

# Background saves that failed and whose error nobody has seen yet: logged at interpreter exit.
_unreported: weakref.WeakSet[BackgroundSave] = weakref.WeakSet()


class BackgroundSave:
    """Runs `job` on a non-daemon thread (so interpreter exit waits for it) and keeps its outcome."""

    def __init__(self, job: Callable[[], str], name: str, step: int = -1):
        self.step = step
        self.result: str | None = None
        self._error: BaseException | None = None
        self.reported = False  # the error was raised to the caller once; it is not raised again
        self._thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], str]) -> None:
        try:
            self.result = job()
        except BaseException as exc:  # handed to whoever waits, on the caller's thread
            self._error = exc
            _unreported.add(self)
            log.error("background save of step %d failed: %s: %s", self.step, type(exc).__name__, exc)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def error(self) -> BaseException | None:
        """The save's error once it failed; None while it runs or after it committed."""
        return self._error if self.done() else None

    def settle(self) -> BaseException | None:
        """Block until the save has finished; its error (now counted as seen by the caller), if any."""
        self._thread.join()
        if self._error is not None:
            self.reported = True
            _unreported.discard(self)
        return self._error

    def wait(self) -> str | None:
        """Block until the save is committed (or failed); re-raise its error here, once."""
        self._thread.join()
        if self._error is not None and not self.reported:
            self.reported = True
            _unreported.discard(self)
            raise self._error
        return self.result


class SaveHandle:
    """What `save(async_save=True)` returns: the save in flight, until it commits or fails.

    `path` is None until the checkpoint is committed, so nothing names a checkpoint that may never exist.
    A failure is raised once: by `wait()`, or else on every rank at the coordinator's next save, `wait()` or
    `close()`; one nobody waited for is logged at interpreter exit.
    """

    def __init__(self, job: BackgroundSave):
        self._job = job

    @property
    def step(self) -> int:
        return self._job.step

    @property
    def path(self) -> str | None:
        """The committed checkpoint's path; None while the save runs, and for ever if it failed."""
        return self._job.result if self.done() else None

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._job.done()

    def exception(self) -> BaseException | None:
        """The save's error once it failed; None while it runs or after it committed. Does not block."""
        return self._job.error()

    def wait(self) -> str:
        """Block until the save is committed and return its path, or raise its error (every time it is called;
        the coordinator then does not raise it again). Not collective: each rank waits for its own part."""
        error = self._job.settle()
        if error is not None:
            raise error
        return self._job.result or ""

    def __repr__(self) -> str:
        state = f"committed at {self.path}" if self.path else "failed" if self.exception() else "in flight"
        return f"SaveHandle(step={self.step}, {state})"


@atexit.register
def _log_unreported() -> None:
    for job in list(_unreported):
        log.error("an async save of step %d failed and its error was never raised to the program (nobody called "
                  "wait(), save() or close() after it): %s: %s", job.step, type(job._error).__name__, job._error)
