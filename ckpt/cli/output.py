"""How the `ckpt` command prints: tables, key/value pairs, JSON, progress on stderr, and its exit statuses."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..retention.catalog import human_size
from .inspection import Progress

EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_DELETED = 0, 1, 2, 3

# ---- output helpers ------------------------------------------------------------------------------

def metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()) or "-"


def time_text(utc: str | None) -> str:
    return utc.replace("T", " ")[:19] if utc else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Rows as aligned text columns (the last column is not padded)."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        parts[-1] = parts[-1].rstrip() if len(headers) - 1 not in right else parts[-1]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def pairs(rows: Sequence[Sequence[Any]]) -> str:
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k!s:<{width}}  {v}" for k, v in rows)


def emit(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def print_json(data: Any) -> None:
    emit(json.dumps(data, indent=1))


def progress_for(args: argparse.Namespace, label: str) -> Progress | None:
    """A progress line on stderr, only when a person is watching (stdout is a terminal) and not --json."""
    if args.json or not sys.stdout.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct != last[0]:
            last[0] = pct
            sys.stderr.write(f"\r{label}: {pct:3d}% ({human_size(done)} of {human_size(total)})")
            if done >= total:
                sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    return show
