"""NoRecovery: what the loop talks to when a run has no recovery policy.

It answers every question the loop asks a RecoveryController the way a run without recovery behaves (no
extra state, nothing to agree on, the optimizer step always applied at the configured LR), so the loop calls
`trainer.recovery` unconditionally. `enabled` is False: the few places where the plain loop does the work
itself (its own training step, the divergence-stop save guard) ask that once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt import StateComponent


class NoRecovery:
    """The null recovery controller: every hook is a no-op, every answer the plain loop's."""

    enabled = False
    watchdog = None

    def components(self) -> list[StateComponent]:
        return []

    def begin(self, resumed: bool) -> None:
        """Nothing to set up."""

    def end(self) -> None:
        """Nothing to tear down."""

    def at_step_boundary(self, stop: bool) -> bool:
        return stop

    def record_hang(self, step: int, elapsed: float, timeout_s: float) -> None:
        """The step watchdog alone reports a hang."""

    def local_requests(self) -> list[float]:
        return []

    def absorb(self, summed: list[float]) -> None:
        """No requests were sent, so none come back."""

    def lr_scale(self, step: int) -> float:
        return 1.0

    def gate_step(self, loss: float, grad_norm: float) -> bool:
        return True

    def log_fields(self) -> dict[str, Any]:
        return {}

    def after_save(self, path: str, metrics: Mapping[str, Any]) -> None:
        """No host copies are kept."""
