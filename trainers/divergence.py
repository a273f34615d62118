"""DivergenceDetector: notice a run going bad within tens of steps, and never miss a NaN.

It watches one value per log line (the train loss by default), or with `per_step=True` every step's loss, as
the ranks agreed on it with the step's other flags (the trainer's on_step_agreed hook: no extra
communication, and every rank decides alike); warm-up, smoothing and patience then count steps.
The monitored value is smoothed with an EMA, and the detector counts consecutive
observations whose smoothed value is worse than the best level the run has reached by `threshold`
(absolute) or by the factor `relative_threshold`; `patience` of those in a row trigger. The best level is
the best smoothed value, except while the smoothed value is improving at every observation: then the EMA
lags a curve that is still falling fast, and the median of the last `best_window` raw values (so one lucky
batch does not set it) stands for the level instead; otherwise a jump back to where the EMA was would never
count. On a flat noisy curve that median is never used, so noise does not drag the best down. A NaN or Inf
triggers at once, never enters the EMA or the best, and does not stop the detector from working later.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ckpt import infer_greater_is_better

from .callbacks import TrainerCallback, TrainerControl

log = logging.getLogger("trainers")

ACTIONS = ("stop", "abort", "rollback")
BEST_WINDOW = 4  # raw observations whose median is a candidate for the best level
# Settings left at None take these: one observation per log line, or one per step (a step's loss is noisier
# and there are many more of them, so it is smoothed more and needs more of them in a row).
PER_LOG_DEFAULTS = {"smoothing": 0.3, "patience": 3, "warmup": 10}
PER_STEP_DEFAULTS = {"smoothing": 0.07, "patience": 15, "warmup": 20}
_NORM_SUFFIXES = ("norm", "norms")  # grad_norm, weight_norm, ...: lower is better


def infer_direction(name: str) -> bool | None:
    """greater_is_better for a watched value's name (None when the name does not say): ckpt's inference for
    metric names, plus norms (grad_norm, param_norm), which are lower-is-better."""
    inferred = infer_greater_is_better(name)
    if inferred is None and name.lower().replace("-", "_").split("_")[-1] in _NORM_SUFFIXES:
        return False
    return inferred


@dataclass
class DivergenceDetector(TrainerCallback):
    """Watches a logged value and triggers on divergence; usable with or without a trainer.

    `observe(value, step)` returns True on the observation that triggers. As a callback it is fed by
    `on_log` (the train loss, or `metric_key`) or by `on_evaluate` (`use_eval_loss`), and on a trigger
    it reports through `on_instability` and steers the loop according to `action`:
    "stop" (save, then stop), "abort" (stop without saving), "rollback" (hand over to recovery).
    """

    smoothing: float | None = None
    """EMA weight of the newest observation (0 < smoothing <= 1; 1 means no smoothing). None: 0.3 per log line,
    0.07 per step (per_step)."""
    threshold: float | None = 1.0
    """Absolute excess over the best smoothed value that counts as bad (None to use only the relative rule)."""
    relative_threshold: float | None = None
    """Factor over the best smoothed value that counts as bad, e.g. 1.5 (None to use only the absolute rule)."""
    patience: int | None = None
    """Consecutive bad observations that trigger. None: 3 log lines, 15 steps (per_step)."""
    warmup: int | None = None
    """Observations ignored at the start (they still warm up the EMA); NaN/Inf trigger even then. None: 10 log
    lines, 20 steps (per_step)."""
    action: str = "stop"
    """What the trainer does on a trigger: "stop", "abort" or "rollback"."""
    per_step: bool = False
    """Watch every training step's loss (the mean over ranks that each step's agreement already computes, so no
    extra communication; steps recovery skipped are left out) instead of one value per log line; warmup and
    patience then count steps, and smoothing applies per step. Only for the train loss."""
    use_eval_loss: bool = False
    """Watch the evaluation loss (from on_evaluate) instead of the train loss (from on_log)."""
    metric_key: str | None = None
    """Watch this logged key instead (e.g. "grad_norm", "eval_accuracy")."""
    greater_is_better: bool | None = None
    """Direction of the watched value; None infers it from its name (loss-like and *_norm names: lower is
    better)."""

    # Running state (saved with checkpoints).
    smoothed: float | None = field(default=None, init=False)
    best: float | None = field(default=None, init=False)
    observations: int = field(default=0, init=False)
    consecutive: int = field(default=0, init=False)
    triggered_at: int | None = field(default=None, init=False)
    first_bad_step: int | None = field(default=None, init=False)
    """Step of the first observation of the bad run that triggers: the earliest of the unbroken run of raw
    values already bad against the best when the smoothed value turned bad (the EMA lags a sudden rise), so a
    rollback goes to a checkpoint from before it."""
    raw_bad_since: int | None = field(default=None, init=False)
    last_good_step: int | None = field(default=None, init=False)
    """Step of the newest observation where neither the raw nor the smoothed value was bad (warm-up ones
    count as good); see checked_through()."""
    last_checked: int | None = field(default=None, init=False)
    """checked_through(): the newest step whose weights the last good observation vouches for."""
    recent: list[float] = field(default_factory=list, init=False)
    """The last best_window finite raw values."""
    recent_smoothed: list[float] = field(default_factory=list, init=False)
    """The smoothed values after each of the last best_window + 1 finite observations."""
    _from_eval: bool = field(default=False, init=False, repr=False)  # fed by on_evaluate (not by on_log)

    def __post_init__(self) -> None:
        defaults = PER_STEP_DEFAULTS if self.per_step else PER_LOG_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, int | float) or not 0 < self.smoothing <= 1:
            raise ValueError(f"DivergenceDetector: smoothing={self.smoothing!r} must be in (0, 1]")
        if self.threshold is None and self.relative_threshold is None:
            raise ValueError("DivergenceDetector: threshold and relative_threshold are both None; set at least one")
        if self.threshold is not None and self.threshold <= 0:
            raise ValueError(f"DivergenceDetector: threshold={self.threshold!r} must be positive (or None)")
        if self.relative_threshold is not None and self.relative_threshold <= 1:
            raise ValueError(f"DivergenceDetector: relative_threshold={self.relative_threshold!r} must be > 1 "
                             "(a factor over the best value), or None")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"DivergenceDetector: patience={self.patience!r} must be an int >= 1")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"DivergenceDetector: warmup={self.warmup!r} must be an int >= 0")
        if self.per_step and (self.use_eval_loss or self.metric_key is not None):
            raise ValueError("DivergenceDetector: per_step=True watches each step's train loss; it cannot be combined "
                             "with use_eval_loss or metric_key (set per_step=False to watch those per log line)")
        if self.action not in ACTIONS:
            raise ValueError(f"DivergenceDetector: action={self.action!r} must be one of {ACTIONS}")
        if self.greater_is_better is None:
            inferred = infer_direction(self.monitored)
            if inferred is None and self.metric_key is not None:
                raise ValueError(f"DivergenceDetector: cannot tell whether {self.metric_key!r} is better high or "
                                 "low; pass greater_is_better=True or False")
            self.greater_is_better = bool(inferred)

    @property
    def best_window(self) -> int:
        """Raw observations whose median may stand for the level: BEST_WINDOW per log line; per step, about the
        EMA's own span (2 / smoothing - 1), since a step's loss is far noisier than a log line's mean and a
        median of a few of them would let the best sink with the noise."""
        if not self.per_step:
            return BEST_WINDOW
        return max(BEST_WINDOW, round(2 / self.smoothing) - 1)

    @property
    def monitored(self) -> str:
        """The name of the watched value."""
        if self.metric_key is not None:
            return self.metric_key
        return "eval_loss" if self.use_eval_loss else "loss"

    # ---- detection ------------------------------------------------------------------------------

    def observe(self, value: float, step: int) -> bool:
        """Feed one observation; True when this one triggers."""
        value = float(value)
        if not math.isfinite(value):
            self.consecutive = 0
            self.first_bad_step = step
            self.triggered_at = step
            return True
        self.observations += 1
        self.smoothed = value if self.smoothed is None else self.smoothing * value + (1 - self.smoothing) * self.smoothed
        self.recent = [*self.recent, value][-self.best_window:]
        self.recent_smoothed = [*self.recent_smoothed, self.smoothed][-(self.best_window + 1):]
        if self.observations <= self.warmup:
            self._good(step)
            return False
        level = self.smoothed
        median = statistics.median(self.recent)
        if self._falling() and self._better(median, self.smoothed):
            level = median
        if self.best is None or self._better(level, self.best):
            self.best = level
        raw_bad = self._bad(value, self.best)
        if raw_bad:
            self.raw_bad_since = step if self.raw_bad_since is None else self.raw_bad_since
        else:
            self.raw_bad_since = None
        if self._bad(self.smoothed, self.best):
            if self.consecutive == 0:
                self.first_bad_step = step if self.raw_bad_since is None else min(step, self.raw_bad_since)
            self.consecutive += 1
        else:
            self.consecutive = 0
            self.first_bad_step = None
            if not raw_bad:
                self._good(step)
        if self.consecutive >= self.patience:
            self.triggered_at = step
            self.consecutive = 0  # keep watching: a run that recovers (or is rolled back) can trigger again
            return True
        return False

    def suspicion(self) -> tuple[int, int | None] | None:
        """(first suspect step, last good step) while a bad run is in progress (the raw or the smoothed value
        already bad), else None."""
        starts = [s for s in (self.first_bad_step if self.consecutive > 0 else None, self.raw_bad_since)
                  if s is not None]
        return (min(starts), self.checked_through()) if starts else None

    def _good(self, step: int) -> None:
        self.last_good_step = step
        # What this observation vouches for is fixed now, by where it came from (see checked_through).
        self.last_checked = step if self._from_eval else step - 1

    def checked_through(self) -> int | None:
        """The newest step whose weights a good observation vouches for: an evaluation at step s checks the
        weights of step s; a train-loss log line at step s averages losses computed on the weights of the
        steps before s (the weights after step s were never used)."""
        return self.last_checked

    def _falling(self) -> bool:
        """Whether the smoothed value improved at each of the last best_window observations: only then does it
        lag the curve, and only then may the raw values' median stand for the level (on a flat, noisy curve
        a running best of that median would sink with the noise and make noise look like divergence)."""
        s = self.recent_smoothed
        return len(s) > self.best_window and all(self._better(b, a) for a, b in itertools.pairwise(s))

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.greater_is_better else a < b

    def _bad(self, value: float, best: float) -> bool:
        """Worse than `best` by the absolute or the relative rule. The relative rule measures the move against
        |best| (for a positive best: value >= best x factor, or <= best / factor when greater is better), so it
        also works for negative values; a best of exactly 0 gives it no scale, and it then says nothing."""
        worse = (value - best) if not self.greater_is_better else (best - value)
        if self.threshold is not None and worse >= self.threshold:
            return True
        if self.relative_threshold is None:
            return False
        if best == 0:
            self._warn_zero_best()
            return False
        factor = self.relative_threshold - 1 if not self.greater_is_better else 1 - 1 / self.relative_threshold
        return worse >= factor * abs(best)

    def _warn_zero_best(self) -> None:
        if self.threshold is None and not getattr(self, "_warned_zero", False):
            self._warned_zero = True
            log.warning("DivergenceDetector: the best %s is 0, so relative_threshold (a factor over it) cannot "
                        "judge later values; set threshold (an absolute margin) as well", self.monitored)

    def reset(self) -> None:
        """Forget the run's history (e.g. after a rollback to an older checkpoint)."""
        self.smoothed = self.best = self.triggered_at = self.first_bad_step = self.raw_bad_since = None
        self.last_good_step = self.last_checked = None
        self.recent, self.recent_smoothed = [], []
        self.observations = self.consecutive = 0

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "best": self.best, "observations": self.observations,
                "consecutive": self.consecutive, "triggered_at": self.triggered_at,
                "first_bad_step": self.first_bad_step, "raw_bad_since": self.raw_bad_since,
                "last_good_step": self.last_good_step, "last_checked": self.last_checked,
                "recent": list(self.recent),
                "recent_smoothed": list(self.recent_smoothed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothed, self.best = state["smoothed"], state["best"]
        self.observations, self.consecutive = int(state["observations"]), int(state["consecutive"])
        self.triggered_at, self.first_bad_step = state.get("triggered_at"), state.get("first_bad_step")
        self.raw_bad_since = state.get("raw_bad_since")
        self.last_good_step = state.get("last_good_step")  # absent in checkpoints of earlier versions
        self.last_checked = state.get("last_checked", None if self.last_good_step is None else self.last_good_step - 1)
        self.recent = [float(v) for v in state.get("recent", [])]
        self.recent_smoothed = [float(v) for v in state.get("recent_smoothed", [])]

    # ---- trainer hooks --------------------------------------------------------------------------

    def on_step_agreed(self, args, state, control: TrainerControl, **kwargs: Any) -> None:
        if self.per_step and not kwargs.get("skipped", False):
            self._from_eval = False  # step s's loss was computed on the weights of step s - 1
            self._feed(float(kwargs["loss"]), state, control, kwargs)

    def on_log(self, args, state, control: TrainerControl, **kwargs: Any) -> None:
        if self.use_eval_loss or self.per_step:
            return
        logs = kwargs.get("logs") or {}
        if self.monitored in logs:
            self._from_eval = False
            self._feed(float(logs[self.monitored]), state, control, kwargs)

    def on_evaluate(self, args, state, control: TrainerControl, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics") or {}
        key = self.monitored if self.monitored in metrics else f"eval_{self.monitored}"
        if (self.use_eval_loss or self.metric_key is not None) and key in metrics:
            self._from_eval = True
            self._feed(float(metrics[key]), state, control, kwargs)

    def _feed(self, value: float, state, control: TrainerControl, kwargs: dict) -> None:
        if not self.observe(value, state.global_step):
            return
        reason = "non_finite_metric" if not math.isfinite(value) else "divergence"
        trainer = kwargs.get("trainer")
        event = {"reason": reason, "metric": self.monitored, "value": value, "best": self.best,
                 "smoothed": self.smoothed, "first_bad_step": self.first_bad_step,
                 "last_good_step": self.last_good_step, "checked_through": self.checked_through(),
                 "action": self.action}
        if trainer is not None and hasattr(trainer, "report_instability"):
            trainer.report_instability(event)  # recovery decides, and may change the action
            return
        if self.action == "abort":
            control.should_abort_without_save = True
        elif self.action == "stop":
            control.should_save = True
        control.should_training_stop = True



# The names earlier versions of these tools used.
DualTimeScaleDivergenceDetector = DivergenceDetector
DualWindowDivergenceDetector = DivergenceDetector
