"""The `ckpt` command (`ls`, `inspect`, `verify`, `diff`, `export`, `import`, `report`, `prune`, `pin`), and the
offline inspection, export (also to Hugging Face, DCP and torch.save), import and run report it is built on. See
docs/cli.md and docs/migration.md."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
