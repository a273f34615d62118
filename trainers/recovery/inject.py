"""FaultInjection: make a run go wrong on purpose, to see recovery work (the demo's --inject-* flags, tests).

Each fault fires once per process, at the start of its step: the learning rate multiplied (divergence, on
every rank), a NaN loss, an out-of-memory error in the forward pass, or a hang in a collective no other
rank joins (NaN, OOM and hang on one rank). The hang fires only on a job's first attempt
(TORCHELASTIC_RESTART_COUNT unset or 0), so a torchrun restart gets through.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..callbacks import TrainerCallback

log = logging.getLogger("trainers")


@dataclass
class FaultInjection(TrainerCallback):
    """Injects the faults whose step is set (steps are 1-based: the step being computed)."""

    divergence_step: int | None = None
    divergence_lr_factor: float = 50.0
    """The learning rate (and the scheduler's base rates) is multiplied by this at divergence_step."""
    nan_step: int | None = None
    oom_step: int | None = None
    hang_step: int | None = None
    rank: int | None = None
    """The rank where the NaN, the out-of-memory error and the hang happen; None: the last rank."""
    fired: set[str] = field(default_factory=set, init=False)

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        trainer = kwargs["trainer"]
        self._here = trainer.rank == (trainer.world_size - 1 if self.rank is None else self.rank)
        self._step = state.global_step + 1
        if not getattr(self, "_hooked", False):
            kwargs["model"].register_forward_hook(self._forward_hook)
            self._hooked = True

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        self._step = state.global_step + 1
        if self._due("divergence", self.divergence_step, here=True):
            f = self.divergence_lr_factor
            for group in kwargs["optimizer"].param_groups:
                group["lr"] = group["lr"] * f
            scheduler = kwargs.get("lr_scheduler")
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * f for lr in scheduler.base_lrs]
            if kwargs["trainer"].rank == 0:
                log.warning("fault injection: learning rate x%g at step %d", f, self._step)

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.nan_step is not None and state.global_step == self.nan_step:
            self.fired.add("nan")  # every micro-batch of that step got its NaN

    def _due(self, fault: str, step: int | None, *, here: bool) -> bool:
        if step is None or self._step != step or fault in self.fired or not here:
            return False
        if fault != "nan":
            self.fired.add(fault)
        return True

    def _forward_hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if self._due("oom", self.oom_step, here=self._here):
            log.warning("fault injection: out of memory on this rank at step %d", self._step)
            raise torch.OutOfMemoryError(f"injected out-of-memory error at step {self._step}")
        if self._due("hang", self.hang_step, here=self._here) and os.environ.get(
                "TORCHELASTIC_RESTART_COUNT", "0") == "0":
            log.warning("fault injection: hanging in a collective at step %d", self._step)
            if dist.is_initialized():
                dist.barrier()  # no other rank joins it
            raise RuntimeError("fault injection: the injected hang ended")
        if self._due("nan", self.nan_step, here=self._here) and isinstance(output, torch.Tensor):
            return output * float("nan")
        return output
