"""State and rank functions shared by the multi-process tests (importable by spawned ranks)."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ckpt import SharingPattern, StateComponent


class Box:
    """A Stateful holding an arbitrary state dict (the value is replaced on load)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class RNGState:
    """torch, Python and NumPy random generators as one PER_RANK component."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])


def model_and_rng(model: Any, rng: dict[str, Any]) -> list[StateComponent]:
    """The usual pair of a multi-process test: "model", the same on every rank (REPLICATED; a dict is boxed),
    and "rng", different on every rank (PER_RANK)."""
    return [StateComponent("model", Box(model) if isinstance(model, dict) else model, SharingPattern.REPLICATED),
            StateComponent("rng", Box(rng), SharingPattern.PER_RANK)]


def draw() -> tuple:
    """The next value of every generator RNGState covers."""
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and AdamW after two identical steps (so optimizer state exists)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):
        model(torch.randn(4, 16, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def rich_state(tag: int) -> dict[str, Any]:
    """Nested values of every supported kind, varying with `tag`."""
    g = torch.Generator().manual_seed(1000 + tag)
    return {
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3) + tag,
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(float(tag)),
        "flags": torch.tensor([True, False, bool(tag % 2)]),
        "nested": {"level": {0: {"deep": torch.full((2,), float(tag)), "note": f"tag {tag}"}}, 7: [1, 2.5, None]},
        "tuple": (tag, "x", (1.5, b"\x00\xff"), [torch.ones(2) * tag]),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "numpy": np.arange(4, dtype=np.uint32) + tag,
        "np_scalar": np.float32(tag) / 3,
        "big": 2**70 + tag,
        "none": None,
        "bytes": bytes([tag % 256]) * 3,
        "flag": True,
    }


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested state, including types and tensor dtypes/bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a, b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1 else b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def snapshot(obj: Any) -> Any:
    return copy.deepcopy(obj.state_dict())
