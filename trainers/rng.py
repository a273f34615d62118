"""The random streams a training step draws from (seeded once, saved per rank), and full determinism."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ckpt import RNGState  # the generators as one PER_RANK component; one home for it, in ckpt

__all__ = ["RNGState", "prepare_full_determinism", "set_seed"]

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
