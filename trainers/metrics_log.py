"""What rank 0 shows and records: one log line per logging window, a progress bar, and metrics.jsonl.

The log lines go through the `trainers` logger. When nothing is configured (no handler on it nor on the root
logger), rank 0 attaches a stderr handler of its own so that they are seen; it stays quiet as soon as the user
configures logging, so no line is shown twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

from .keys import METRICS_FILE

log = logging.getLogger("trainers")


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, float):
        if name == "lr":
            return f"{name} {value:.3e}"
        if name.endswith("per_s"):
            return f"{name.replace('_per_s', '/s')} {value:,.1f}"
        return f"{name} {value:.4f}" if math.isfinite(value) else f"{name} {value}"
    return f"{name} {value}"


class _FallbackHandler(logging.StreamHandler):
    """Shows the `trainers` log on stderr while logging is not configured; silent once it is."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))

    set_level = False  # whether attaching it raised the `trainers` logger to INFO (undone when it steps aside)

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or any(h is not self for h in log.handlers):
            # Configured meanwhile: those handlers show it, at the levels the user chose.
            log.removeHandler(self)
            if self.set_level and log.level == logging.INFO:
                log.setLevel(logging.NOTSET)
            return
        self.stream = sys.stderr  # looked up at each line, so a redirected stderr gets it
        super().emit(record)


def show_logs_by_default() -> None:
    """Attach the fallback handler when neither the `trainers` logger nor the root logger has a handler."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = _FallbackHandler()
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
        handler.set_level = True


class MetricsLogger:
    """Rank 0's view of the run. On other ranks every method does nothing."""

    def __init__(self, output_dir: str, *, enabled: bool, max_steps: int, progress_bar: bool | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.bar = enabled and (sys.stderr.isatty() if progress_bar is None else progress_bar)
        self._bar_shown = False
        if enabled:
            show_logs_by_default()

    def start(self, resumed_step: int | None) -> None:
        """Open the metrics file; after a resume, drop lines a crashed run wrote past the resumed step."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if resumed_step is None or not os.path.exists(self.path):
            if resumed_step is None and os.path.exists(self.path):
                os.replace(self.path, self.path + ".previous")  # a fresh run in an old dir keeps the old log
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, kind: str, entry: dict[str, Any]) -> None:
        """Log one line and append it to metrics.jsonl."""
        if not self.enabled:
            return
        self._clear_bar()
        step = entry.get("step")
        shown = " | ".join(_fmt(k, v) for k, v in entry.items() if k != "step")
        log.info("%s step %s/%d | %s", kind, step, self.max_steps, shown)
        self.append(kind, entry)

    def append(self, kind: str, entry: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (without a log line)."""
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **entry}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def progress(self, step: int, loss: float | None = None) -> None:
        if not self.bar:
            return
        width = 30
        done = int(width * step / max(self.max_steps, 1))
        tail = f" loss {loss:.4f}" if loss is not None and math.isfinite(loss) else ""
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.max_steps}{tail}")
        sys.stderr.flush()
        self._bar_shown = True

    def _clear_bar(self) -> None:
        if self._bar_shown:
            sys.stderr.write("\r\033[K")
            self._bar_shown = False

    def close(self) -> None:
        if self.bar and self._bar_shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._bar_shown = False
