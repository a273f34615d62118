"""The random streams a training step draws from, seeded once and saved per rank."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python `random` and NumPy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


class RNGState:
    """torch CPU and CUDA, Python `random` and NumPy generators as one Stateful (saved PER_RANK)."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                raise ValueError(f"the checkpoint holds CUDA RNG state for {len(cuda)} devices; this process sees "
                                 f"{torch.cuda.device_count()}. Resume with the same devices visible per rank")
            torch.cuda.set_rng_state_all(cuda)
