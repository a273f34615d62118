"""The `ckpt` command (`ls`, `inspect`, `verify`, `diff`, `export`, `prune`, `pin`), and the offline
inspection and export it is built on. See docs/cli.md."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
