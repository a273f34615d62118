"""RecoveryPolicy: what a trainer does when a run goes bad, built in code or read from a TOML file.

    [recovery]
    nan_action = "rollback"
    max_consecutive_nan = 3
    ...
    [recovery.detector]      # optional: settings of the DivergenceDetector the trainer adds
    patience = 3

Unknown keys and bad values are errors naming the key, the value and what would be accepted.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..divergence import DivergenceDetector

NAN_ACTIONS = ("warn", "skip", "raise", "rollback")
DIVERGENCE_ACTIONS = ("stop", "abort", "rollback")
ROLLBACK_TARGETS = ("last_good", "best", "steps_back:N")
# DivergenceDetector settings a policy may give; `action` is not one of them: divergence_action decides.
DETECTOR_KEYS = ("smoothing", "threshold", "relative_threshold", "patience", "warmup", "per_step", "use_eval_loss",
                 "metric_key", "greater_is_better")
TABLE = "recovery"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RecoveryPolicy:
    """How a trainer reacts to NaNs, gradient spikes, divergence, out-of-memory errors, hangs and signals.

    Invalid values raise ValueError naming the option, the value and the fix. See docs/recovery.md.
    """

    nan_action: str = "rollback"
    """A step whose loss or gradient norm is NaN/Inf on any rank: "warn" (apply it anyway), "skip" (skip the
    optimizer step on every rank; an error after max_consecutive_nan in a row), "raise" (an error at once),
    "rollback" (skip it; after max_consecutive_nan in a row, roll back to the last good checkpoint)."""
    max_consecutive_nan: int = 3
    """Non-finite steps in a row that are skipped before nan_action "skip"/"rollback" escalates."""
    divergence_action: str = "rollback"
    """What a divergence (reported by DivergenceDetector) does: "stop" (save, marked diverged, then stop),
    "abort" (stop without saving) or "rollback"."""
    rollback_to: str = "last_good"
    """"last_good" (the newest checkpoint whose weights a good observation vouches for), "best" (the best by
    the retention metric among those), or "steps_back:N" (the newest of those at least N steps before the
    trigger)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in a run; one more trigger then stops training with a clear message."""
    lr_factor: float = 0.5
    """After a rollback the learning rate in force is multiplied by this (0 < lr_factor <= 1) ..."""
    lr_ramp_steps: int = 200
    """... and ramped back linearly to the scheduled value over this many steps (0: the cut stays)."""
    rollback_memory_mb: float = 0.0
    """Host memory per rank, in MiB, for copies of the newest checkpoints' state (taken at each save), so a
    rollback to one of them reads nothing from the disk; 0 keeps none. A rollback whose target is not held
    on every rank loads it from the disk."""
    skip_batches: int = 0
    """After a rollback, drop this many batches when the replay reaches the step that went bad (first_bad_step):
    the offending data is not seen again, the good data before it is; 0 replays everything."""
    grad_norm_spike_factor: float = 10.0
    """A step whose gradient norm exceeds this times the running median is a spike: with max_grad_norm set its
    clipped update is applied ("clip"), except the first spike of a streak whose loss jumped too, which is
    skipped; without clipping it is skipped (on every rank). 0 turns the check off."""
    max_consecutive_spikes: int = 10
    """Spikes in a row after which the run counts as diverged (divergence_action, from the first one) when the
    loss jumped on at least half of them; otherwise the new gradient-norm level is accepted as the baseline."""
    grad_norm_window: int = 100
    """Steps in the running medians of the gradient norm and of the loss (checks start once they hold 10)."""
    oom_retry: bool = True
    """On out-of-memory on any rank, halve the micro-batch on every rank (gradient accumulation keeps the
    global batch) and retry the step, down to 1 sample; then an error."""
    health_check_interval: int = 100
    """Steps between liveness checks of every rank (0: off). With checks on, the per-step agreement between
    ranks also times out after health_check_timeout_s. A failed check exits the process with code 75."""
    health_check_timeout_s: float = 60.0
    """How long a rank waits for the others at a liveness check or the per-step agreement."""
    handle_signals: bool = True
    """On SIGTERM or SIGUSR1, save a checkpoint at the next step boundary and stop cleanly."""
    detector: dict[str, Any] | None = field(default_factory=dict)
    """Settings of the DivergenceDetector the trainer adds when none is among its callbacks (keys: see
    DETECTOR_KEYS); None adds none."""

    def __post_init__(self) -> None:
        self._check_actions()
        self._check_counts()
        self._check_detector()

    def _check_actions(self) -> None:
        if self.nan_action not in NAN_ACTIONS:
            _fail("nan_action", self.nan_action, f"must be one of {', '.join(NAN_ACTIONS)}")
        if self.divergence_action not in DIVERGENCE_ACTIONS:
            _fail("divergence_action", self.divergence_action, f"must be one of {', '.join(DIVERGENCE_ACTIONS)}")
        if not isinstance(self.rollback_to, str) or not (
                self.rollback_to in ("last_good", "best") or _steps_back(self.rollback_to) is not None):
            _fail("rollback_to", self.rollback_to,
                  'must be "last_good", "best" or "steps_back:N" with N an int >= 1 (e.g. "steps_back:500")')
        for name in ("oom_retry", "handle_signals"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")

    def _check_counts(self) -> None:
        for name, low in (("max_consecutive_nan", 1), ("max_consecutive_spikes", 1), ("max_rollbacks", 0), ("lr_ramp_steps", 0),
                          ("skip_batches", 0), ("grad_norm_window", 10), ("health_check_interval", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                _fail(name, value, f"must be an int >= {low}")
        if not _is_number(self.lr_factor) or not 0 < self.lr_factor <= 1:
            _fail("lr_factor", self.lr_factor, "must be a number in (0, 1] (1 keeps the learning rate)")
        spike = self.grad_norm_spike_factor
        if not _is_number(spike) or not (spike == 0 or spike > 1):
            _fail("grad_norm_spike_factor", spike, "must be a number > 1 (a factor over the running median), or 0 "
                  "to turn the check off")
        if not _is_number(self.rollback_memory_mb) or self.rollback_memory_mb < 0:
            _fail("rollback_memory_mb", self.rollback_memory_mb, "must be a number of MiB >= 0 (0: no copies in memory)")
        if not _is_number(self.health_check_timeout_s) or self.health_check_timeout_s <= 0:
            _fail("health_check_timeout_s", self.health_check_timeout_s, "must be a number of seconds > 0")

    def _check_detector(self) -> None:
        if self.detector is None:
            return
        if not isinstance(self.detector, Mapping):
            _fail("detector", self.detector, "must be a table of DivergenceDetector settings, or None for no "
                  "automatic detector")
        for key in self.detector:
            if key == "action":
                raise ValueError("recovery policy: detector.action is not a setting here: divergence_action "
                                 "decides what a divergence does")
            if key not in DETECTOR_KEYS:
                raise ValueError(f"recovery policy: unknown key detector.{key}{_did_you_mean(key, DETECTOR_KEYS)}; "
                                 f"known: {', '.join(DETECTOR_KEYS)}")
        try:
            self.make_detector()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"recovery policy: detector: {exc}") from None

    # ---- derived values ------------------------------------------------------------------------

    @property
    def can_roll_back(self) -> bool:
        """Whether NaN streaks or divergence may roll back (a fresh run then saves its initial state)."""
        return "rollback" in (self.nan_action, self.divergence_action)

    @property
    def steps_back(self) -> int | None:
        """N of rollback_to="steps_back:N", else None."""
        return _steps_back(self.rollback_to)

    def make_detector(self) -> DivergenceDetector | None:
        """The DivergenceDetector these settings describe (None when `detector` is None)."""
        if self.detector is None:
            return None
        return DivergenceDetector(**dict(self.detector), action=self.divergence_action)

    def to_plain(self) -> dict[str, Any]:
        """Plain values (for logs, the metrics file and TrainingArguments.to_dict)."""
        out = asdict(self)
        out["detector"] = None if self.detector is None else dict(self.detector)
        return out

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "recovery policy") -> RecoveryPolicy:
        """A policy from the keys of a [recovery] table; `source` prefixes every error."""
        known = [f.name for f in fields(cls)]
        values = dict(data)
        for key in values:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r} in [{TABLE}]{_did_you_mean(key, known)}; "
                                 f"known keys: {', '.join(known)}")
        if values.get("detector") is False:  # `detector = false` in TOML: no automatic detector
            values["detector"] = None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {str(exc).removeprefix('recovery policy: ')}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> RecoveryPolicy:
        """Read the [recovery] table of a TOML file."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"recovery policy file {name} does not exist; pass the path of a TOML file with a "
                             f"[{TABLE}] table, or a trainers.recovery.RecoveryPolicy") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{name}: not valid TOML: {exc}") from None
        stray = [k for k in doc if k != TABLE]
        if stray:
            raise ValueError(f"{name}: unknown key(s) {stray} outside the [{TABLE}] table; put every setting under "
                             f"[{TABLE}]")
        if TABLE not in doc or not isinstance(doc[TABLE], dict):
            raise ValueError(f"{name}: no [{TABLE}] table; the file must start with [{TABLE}]")
        return cls.from_mapping(doc[TABLE], source=name)


def load_recovery_policy(source: Any) -> RecoveryPolicy | None:
    """A RecoveryPolicy from a TOML path, a mapping of its keys, a RecoveryPolicy (returned as is), or None."""
    if source is None or isinstance(source, RecoveryPolicy):
        return source
    if isinstance(source, str | os.PathLike):
        return RecoveryPolicy.from_toml(source)
    if isinstance(source, Mapping):
        return RecoveryPolicy.from_mapping(source)
    raise TypeError(f"recovery={source!r} must be the path of a TOML file, a trainers.recovery.RecoveryPolicy, a "
                    "dict of its keys, or None")


def _steps_back(value: Any) -> int | None:
    if not isinstance(value, str) or not value.startswith("steps_back:"):
        return None
    text = value.removeprefix("steps_back:").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(name: str, value: Any, what: str) -> None:
    raise ValueError(f"recovery policy: {name}={value!r} {what}")
