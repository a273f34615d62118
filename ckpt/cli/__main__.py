"""`python -m ckpt.cli`: the same as the `ckpt` console command."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
