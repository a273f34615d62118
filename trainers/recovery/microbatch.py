"""Micro-batches: splitting a batch along its first dimension, and recognising out-of-memory errors."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import torch

from ..batches import first_tensor


def batch_length(batch: Any) -> int:
    """Samples in `batch`: the first dimension of its first tensor (1 when it has none)."""
    first = first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        parts = [_slice(v, start, stop, n) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


def split_batch(batch: Any, size: int) -> list[tuple[Any, int]]:
    """`batch` cut into micro-batches of at most `size` samples: [(micro_batch, samples), ...].

    Tensors whose first dimension is the batch length are sliced; anything else is passed to every piece.
    """
    n = batch_length(batch)
    if size >= n:
        return [(batch, n)]
    return [(_slice(batch, start, min(start + size, n), n), min(start + size, n) - start)
            for start in range(0, n, size)]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA and other accelerators), the CPU allocator's failure, or MemoryError."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def release_memory() -> None:
    """Give cached memory back after an out-of-memory error, before the retry."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
