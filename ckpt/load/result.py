"""What a load returns, and the checks of its options that depend on each other."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..format.manifest import Manifest


@dataclass(frozen=True)
class LoadResult:
    """What a load did."""

    path: str | None  # None: nothing was loaded (missing_ok=True in a run dir without a checkpoint)
    step: int
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]  # asked for, absent from the checkpoint (or damaged, below), and allowed to be
    not_requested: tuple[str, ...]  # in the checkpoint, passed by no rank (left as they are on disk)
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
    damaged: tuple[str, ...] = ()  # optional components skipped because their files failed checks (strict=False)
    resharded: tuple[str, ...] = ()  # components this rank assembled from every saved copy (reshard=True)
    # fallback=True: newer committed checkpoints that failed verification and were passed over, newest first
    fallback_from: tuple[str, ...] = ()
    # strict=False: tensor keys per component that the live object has and the checkpoint lacks (left as they
    # were), and that the checkpoint has and the live object lacks (not applied to modules; added to dicts)
    missing_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unexpected_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        """Whether a checkpoint was loaded (False only for missing_ok=True with nothing to load)."""
        return self.path is not None


def check_fallback(checkpoint: str | int | os.PathLike, fallback: bool, in_place: bool) -> None:
    if not isinstance(fallback, bool):
        raise TypeError(f"load(fallback={fallback!r}): fallback must be a bool")
    if fallback and not (isinstance(checkpoint, str) and checkpoint == "latest"):
        raise ValueError(f"load(checkpoint={checkpoint!r}, fallback=True): fallback applies to "
                         "checkpoint='latest' only (a checkpoint asked for by name is loaded as asked, or not at all)")
    if fallback and in_place:
        raise ValueError("load(in_place=True, fallback=True): an in-place read changes live tensors before the "
                         "checkpoint is known to verify; pass one of the two")


def check_missing_ok(checkpoint: str | int | os.PathLike, missing_ok: bool) -> None:
    if not isinstance(missing_ok, bool):
        raise TypeError(f"load(missing_ok={missing_ok!r}): missing_ok must be a bool")
    if missing_ok and not (isinstance(checkpoint, str) and checkpoint == "latest"):
        raise ValueError(f"load(checkpoint={checkpoint!r}, missing_ok=True): missing_ok applies to "
                         "checkpoint='latest' only (a checkpoint asked for by name must exist)")


__all__ = ["LoadResult", "check_fallback", "check_missing_ok"]
