"""The random streams a training step draws from (seeded once, saved per rank), and full determinism."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE_DETERMINISTIC = ":4096:8"


def prepare_full_determinism() -> None:
    """Make `torch.use_deterministic_algorithms(True)` usable on CUDA: cuBLAS needs CUBLAS_WORKSPACE_CONFIG set
    before its first use, or deterministic mode raises at the first matrix multiply. Sets it when unset."""
    if os.environ.get(CUBLAS_WORKSPACE_ENV):
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise ValueError(
            f"TrainingArguments: full_determinism=True needs {CUBLAS_WORKSPACE_ENV} set before CUDA starts, but "
            f"CUDA is already initialised in this process and {CUBLAS_WORKSPACE_ENV} is unset; export "
            f"{CUBLAS_WORKSPACE_ENV}={CUBLAS_WORKSPACE_DETERMINISTIC} before launching, or build the trainer before "
            "anything uses CUDA")
    os.environ[CUBLAS_WORKSPACE_ENV] = CUBLAS_WORKSPACE_DETERMINISTIC


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
