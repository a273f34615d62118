"""A save's write-and-commit work running on a thread of its own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ckpt")


class BackgroundSave:
    """Runs `job` on a non-daemon thread (so interpreter exit waits for it) and keeps its outcome."""

    def __init__(self, job: Callable[[], str], name: str):
        self.result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], str]) -> None:
        try:
            self.result = job()
        except BaseException as exc:  # handed to whoever waits, on the caller's thread
            self._error = exc
            # Logged too: if the process ends before anyone waits, this is the only trace of it.
            log.error("background save failed: %s: %s", type(exc).__name__, exc)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> str | None:
        """Block until the save is committed (or failed); re-raise its error here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.result
