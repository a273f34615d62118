"""Recovery from runs that go bad: NaN/Inf consensus, gradient-norm spikes, divergence rollback with an LR
cut and ramp (from host-memory copies of recent checkpoints when they are kept), out-of-memory retry,
liveness checks, SIGTERM saves, and an event log. See docs/recovery.md.

The controller knows the trainer only through the narrow RecoveryHost interface (host.py), so the trainer builds
on recovery and never the reverse.
"""

from __future__ import annotations

from ..outcomes import RecoveryError
from .controller import RecoveryController
from .disabled import NoRecovery
from .events import EVENTS_FILE, RecoveryEvent, read_events
from .inject import FaultInjection
from .policy import RecoveryPolicy, load_recovery_policy
from .restart import init_process_group_for_restarts
from .watchdog import HEALTH_EXIT_CODE

__all__ = [
    "EVENTS_FILE",
    "HEALTH_EXIT_CODE",
    "FaultInjection",
    "NoRecovery",
    "RecoveryController",
    "RecoveryError",
    "RecoveryEvent",
    "RecoveryPolicy",
    "init_process_group_for_restarts",
    "load_recovery_policy",
    "read_events",
]

