"""Paths and bytes of a checkpoint on disk, as the tests look at them."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The checkout's root (tests/support/files.py is two folders below it).
REPO = str(Path(__file__).resolve().parents[2])

MANIFEST = "checkpoint_manifest.json"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> str:
    """The folder a checkpoint of `step` is committed as inside `run_dir`."""
    return os.path.join(run_dir, f"checkpoint-{step:08d}")


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """The parsed manifest of the checkpoint folder `ckpt_dir`."""
    with open(os.path.join(ckpt_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def flip_last_byte(path: str | os.PathLike, mask: int = 0x01) -> None:
    """Flip the bits `mask` of the file's last byte: sizes and headers stay right, only a digest can tell."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte ^ mask]))
