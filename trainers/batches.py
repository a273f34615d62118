"""Small helpers on batches: moving them to a device, counting samples and tokens, finding the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor moved to `device` (dicts, lists and tuples are rebuilt)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # named tuples
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in `batch` (depth first, in order), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """model(**batch) for a dict, model(*batch) for a list or tuple, model(batch) otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


def extract_loss(output: Any) -> torch.Tensor:
    """The scalar loss in a model's output: the output itself, `output["loss"]`, or `output.loss`."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"the model's forward returned {what}, not a scalar loss. Make forward return the loss "
                        "(or a dict / object with a `loss`), or pass loss_fn=lambda model, batch: <scalar loss>")
    return loss.reshape(())
