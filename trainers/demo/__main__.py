"""`python -m trainers.demo` (under torchrun for DDP)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
