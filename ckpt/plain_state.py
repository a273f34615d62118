"""Plain state as a component: a dict or a tensor stands in for a `Stateful`, and the RNG component.

A dict is saved as it is and loaded *in place*: a tensor in the checkpoint is copied into the live tensor of
the same key (same object, same storage), any other value replaces the live one, and nested dicts are loaded
the same way. A tensor is saved as `{"tensor": t}` and loaded by copying into it. Keys and shapes are checked
before anything is copied (ckpt/load/checks.py), so a refused load leaves both untouched.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

TENSOR_KEY = "tensor"  # the one key of a tensor component's state


def is_plain(obj: Any) -> bool:
    """Whether `obj` is plain state (a dict or a tensor) rather than a `Stateful`."""
    return isinstance(obj, MutableMapping | torch.Tensor)


def state_of(obj: Any) -> Any:
    """The state dict to save for `obj`: a Stateful's own, a dict itself, or a tensor under TENSOR_KEY."""
    if isinstance(obj, torch.Tensor):
        return {TENSOR_KEY: obj}
    if isinstance(obj, MutableMapping):
        return obj
    return obj.state_dict()


def load_into(obj: Any, state: Any, strict: bool = True) -> None:
    """Hand `state` to `obj`: modules get `strict`, dicts and tensors are loaded in place."""
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            obj.copy_(state[TENSOR_KEY])
    elif isinstance(obj, MutableMapping):
        load_dict_in_place(obj, state)
    elif isinstance(obj, torch.nn.Module):
        obj.load_state_dict(state, strict=strict)
    else:
        obj.load_state_dict(state)


def load_dict_in_place(live: MutableMapping, state: Mapping) -> None:
    """Tensors copied into the live tensors of the same key, shape and dtype; dicts recursed into; every other
    value (and a tensor of another shape or dtype, which only strict=False lets through) replaced."""
    for key, value in state.items():
        current = live.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor)
                and current.shape == value.shape and current.dtype == value.dtype):
            with torch.no_grad():
                current.copy_(value)
        elif isinstance(value, Mapping) and isinstance(current, MutableMapping):
            load_dict_in_place(current, value)
        else:
            live[key] = value


class RNGState:
    """The process's random generators as one component: torch (CPU, and every CUDA device where CUDA is
    present), Python's `random` and NumPy's global generator. Declare it PER_RANK (`rng_component()`).

    Restore it *after* building anything that draws from these generators at construction (a data loader's
    iterator, a sampler, dropout masks taken at model build), or those draws shift the restored streams.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                 "numpy": np.random.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_python_state(state["python"]))
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            saved = list(state["cuda"])
            if len(saved) != torch.cuda.device_count():
                raise ValueError(f"RNGState: the checkpoint holds the CUDA generators of {len(saved)} devices, this "
                                 f"process sees {torch.cuda.device_count()}; restore with the same devices visible")
            torch.cuda.set_rng_state_all(saved)


def _as_python_state(value: Any) -> tuple:
    """`random.setstate` wants tuples all the way down (a checkpoint may hold lists)."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


__all__ = ["TENSOR_KEY", "RNGState", "is_plain", "load_dict_in_place", "load_into", "state_of"]
