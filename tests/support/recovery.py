"""Runs and callbacks shared by the recovery tests (importable by spawned ranks; holds no tests)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import torch

from tests.support.toys import LossRecorder, Regression, TinyMLP, warmup_then_decay
from trainers import TrainerCallback

# A detector that reacts within a few log lines of the toy regression, and never to its noise.
DETECTOR = {"warmup": 3, "patience": 2, "smoothing": 0.5, "threshold": None, "relative_threshold": 3.0}


class BadLoss(TrainerCallback):
    """The loss becomes NaN (or the forward pass raises out of memory) at the given steps on the given ranks;
    each step once (a rollback replays it clean), or every time with `again`."""

    def __init__(self, steps: set[int], ranks: set[int] | None = None, *, oom: bool = False, again: bool = False):
        self.steps, self.ranks, self.oom, self.again = set(steps), ranks, oom, again
        self.hooked = False
        self.done: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.rank = kwargs["trainer"].rank
        if not self.hooked:
            kwargs["model"].register_forward_hook(self._hook)
            self.hooked = True

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if not self.again:
            self.done.add(state.global_step)

    def _hook(self, module, inputs, output):
        if module.training and self.step in self.steps - self.done and (self.ranks is None or self.rank in self.ranks):
            if self.oom:
                raise torch.OutOfMemoryError("test: out of memory")
            return output * float("nan")
        return output


class SendSignal(TrainerCallback):
    """Sends this process a signal at the end of a step, on one rank."""

    def __init__(self, step: int, rank: int = 0, sig: int = signal.SIGTERM):
        self.step, self.rank, self.sig = step, rank, sig

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if state.global_step == self.step and kwargs["trainer"].rank == self.rank:
            os.kill(os.getpid(), self.sig)


class Instability(TrainerCallback):
    """Records every on_instability call; `set_action` changes the action of events of one kind."""

    def __init__(self, set_action: tuple[str, str] | None = None):
        self.seen: list[Any] = []
        self.set_action = set_action

    def on_instability(self, args, state, control, **kwargs: Any) -> None:
        event = kwargs["event"]
        self.seen.append((event.kind, event.step, event.action))
        if self.set_action and event.kind == self.set_action[0]:
            event.action = self.set_action[1]


def train(run_dir: str, *, recovery: Any, callbacks: list | None = None, max_steps: int = 40, batch: int = 4,
          trainer: str = "simple", lr: float = 3e-2, **extra: Any):
    """Train the toy regression; returns (trainer, loss recorder)."""
    from trainers import DDPTrainer, SimpleTrainer, TrainingArguments

    options = {"logging_steps": 2, "save_steps": 10, "seed": 1, "full_determinism": True, **extra}
    args = TrainingArguments(output_dir=run_dir, max_steps=max_steps, per_device_train_batch_size=batch,
                             recovery=recovery, **options)
    torch.manual_seed(0)
    recorder = LossRecorder()
    cls = SimpleTrainer if trainer == "simple" else DDPTrainer
    t = cls(TinyMLP(), args, train_dataset=Regression(120), eval_dataset=Regression(16, seed=5),
            callbacks=[recorder, *(callbacks or [])],
            optimizer_factory=lambda p: torch.optim.AdamW(p, lr=lr),
            lr_scheduler_factory=warmup_then_decay(max_steps))
    t.train()
    return t, recorder


def logged(trainer: Any, key: str) -> dict[int, Any]:
    """step -> value of `key` in the trainer's train log lines."""
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def logged_step(run, step: int) -> bool:
    """Whether the run's metrics.jsonl has a line at `step` or later (a run in another process got there)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return False
    with open(path) as f:
        return any(json.loads(line).get("step", 0) >= step for line in f if line.strip())
