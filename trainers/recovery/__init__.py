"""Recovery from runs that go bad: NaN/Inf consensus, gradient-norm spikes, divergence rollback with an LR
cut and ramp (from host-memory copies of recent checkpoints when they are kept), out-of-memory retry,
liveness checks, SIGTERM saves, and an event log. See docs/recovery.md.

The controller is imported by the trainer when a policy is set (it builds on trainers.base).
"""

from __future__ import annotations

from .events import EVENTS_FILE, RecoveryEvent, read_events
from .inject import FaultInjection
from .policy import RecoveryPolicy, load_recovery_policy
from .restart import init_process_group_for_restarts
from .watchdog import HEALTH_EXIT_CODE

__all__ = [
    "EVENTS_FILE",
    "HEALTH_EXIT_CODE",
    "FaultInjection",
    "RecoveryEvent",
    "RecoveryPolicy",
    "init_process_group_for_restarts",
    "load_recovery_policy",
    "read_events",
]


def __getattr__(name: str):
    # RecoveryController and RecoveryError build on trainers.base, which imports this package: load on use.
    if name in ("RecoveryController", "RecoveryError"):
        from . import controller

        return getattr(controller, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
