"""Full tensors of a saved component, by their real names, for any sharing pattern: what export, diff and
conversions to other formats read. SHARDED tensors are reassembled from their pieces; the pieces of a
REPLICATED or PER_GROUP tensor split across writers are joined; other patterns give the chosen copy's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..format.manifest import ComponentEntry
from ..io.storage import Storage
from ..patterns.base import tensor_layout_for
from .loading import read_copy_tensors


def full_tensors(storage: Storage, ckpt_dir: str, key: str, entry: ComponentEntry, owner: int | None = None,
                 verify: bool = True, on_file: Callable[[int], Any] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every tensor of one copy of component `key` (`owner`: a rank, group or node for
    the patterns with several copies; ignored by patterns with a placement class, SHARDED among them). A SHARDED component is read one
    tensor at a time, so memory holds one full tensor; names are key paths as in the state dict (a model's
    `0.weight`, an optimizer's `state/0/exp_avg`). Tensors stored as raw bytes (dtypes safetensors lacks) come
    back in that stored form; unflatten the component's skeleton over them for their real dtype."""
    placement = tensor_layout_for(entry.pattern)
    if placement is not None:
        for name, tensor in placement.full_tensors(storage, ckpt_dir, key, entry):
            if on_file is not None:
                on_file(tensor.numel() * tensor.element_size())
            yield name, tensor
        return
    yield from read_copy_tensors(storage, ckpt_dir, key, entry, owner, verify, on_file=on_file).items()


__all__ = ["full_tensors"]
