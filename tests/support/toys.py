"""Toy data, model and callbacks shared by the trainer tests (importable by spawned ranks; holds no tests)."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch

from trainers import TrainerCallback


class Regression:
    """y = sum(x) + noise: a map-style dataset of (x, y) pairs."""

    def __init__(self, n: int = 100, seed: int = 0, dim: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class TinyMLP(torch.nn.Module):
    """Two layers with dropout (so the RNG streams matter); forward returns the loss."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x), y)


def warmup_then_decay(total: int, warmup: int = 5):
    """An LR scheduler factory: linear warm-up, then linear decay to 10% at `total`."""

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        def scale(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)

    return factory


class LossRecorder(TrainerCallback):
    """Every step's loss on this rank, and every evaluation (not saved: it belongs to one process)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.evals: list[int] = []
        self.saves: list[int] = []

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self.losses.append((state.global_step, kwargs["loss"]))

    def on_evaluate(self, args, state, control, **kwargs: Any) -> None:
        self.evals.append(state.global_step)

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        self.saves.append(state.global_step)


class StopAt(TrainerCallback):
    """Stops training after `step` (as a killed job would, but with its checkpoint written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


class Counter(TrainerCallback):
    """A stateful callback: counts steps and remembers the losses it saw."""

    def __init__(self, state_key: str | None = None):
        if state_key is not None:
            self.state_key = state_key
        self.steps = 0
        self.seen: list[float] = []

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self.steps += 1
        self.seen.append(kwargs["loss"])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.seen = list(state["seen"])


def plain(value: Any) -> Any:
    """Nested state with every tensor replaced by (dtype, shape, raw bytes): exact, and safe to send between
    processes (tensors would travel through shared memory that a rank exiting at once tears down)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value) if not hasattr(value, "_fields") else tuple(map(plain, value))
    return copy.deepcopy(value)


def snapshot(trainer: Any) -> dict[str, Any]:
    """What a run ended with, as plain copies (sent back from spawned ranks)."""
    return {
        "model": plain(trainer.unwrapped_model.state_dict()),
        "optimizer": plain(trainer.optimizer.state_dict()),
        "scheduler": plain(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
        "log_history": copy.deepcopy(trainer.state.log_history),
        "step": trainer.state.global_step,
        "tokens_seen": trainer.state.tokens_seen,
        # The next draws of the torch, Python `random` and NumPy streams (the trainer's RNGState holds all three).
        "rng": [torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()],
    }
