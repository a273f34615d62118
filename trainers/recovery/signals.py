"""SIGTERM and SIGUSR1: note the signal, so the loop saves at the next step boundary and stops cleanly.

The first signal only sets a flag (the ranks agree on it with the step's other flags, so all of them save
at the same step); the previous handler is put back at once, so a second signal acts as it would have.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("trainers")

SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Installs the handlers for the duration of training (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not on the main thread: SIGTERM/SIGUSR1 are left to their current handlers")
            return
        for name in SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name
        previous = self._previous.pop(number, None)
        if previous is not None:
            signal.signal(number, previous)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
