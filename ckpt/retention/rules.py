"""Which checkpoints to keep: small composable rules, combined by a policy into one decision.

Each rule looks at the committed checkpoints of a run (oldest first) and says, for the ones it keeps,
why. The policy keeps a checkpoint when any rule does, and drops the rest. Everything here is a pure
function of what is on disk (steps, each manifest's metrics, pins), so a resumed run, a run with another
N and the `ckpt` command all reach the same answer. Deleting is done elsewhere (`ckpt.retention.catalog`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..io.storage import norm_path

# Words that give a metric's direction away. Long words match anywhere in the name; short ones
# only as a whole word (so "acc" is not found in "accumulated_steps").
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse")
_HIGHER_IS_BETTER = ("accuracy", "acc", "f1", "precision", "recall", "auc", "bleu", "rouge", "map", "score")
_WHOLE_WORD_BELOW = 4
EVAL_PREFIX = "eval_"


def infer_greater_is_better(metric: str) -> bool | None:
    """True/False when the name says which way is better (see docs/retention.md), None when it cannot."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", metric).lower()
    # Tokens of the camel-case split ("trainLoss" -> train, loss) and of the name as written, lowercased:
    # the split alone turns an acronym with a lowercase head ("mAP", "eval_mAP", "mAP50") into "m_ap".
    tokens = {t for text in (words, metric.lower()) for t in re.split(r"[^a-z0-9]+", text) if t}
    tokens |= {t.rstrip("0123456789") for t in tokens}
    squashed = words.replace("_", "")

    def found(vocab: Sequence[str]) -> bool:
        return any(w in tokens or (len(w) >= _WHOLE_WORD_BELOW and (w in words or w in squashed)) for w in vocab)

    lower, higher = found(_LOWER_IS_BETTER), found(_HIGHER_IS_BETTER)
    return None if lower == higher else higher


def metric_value(metrics: Mapping[str, Any], metric: str) -> tuple[str, float] | None:
    """The metric as given, else with an `eval_` prefix; None unless it is a finite number."""
    for name in (metric, EVAL_PREFIX + metric):
        if name in metrics:
            value = metrics[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return None  # NaN/Inf are stored as strings; neither ever counts as best
            return name, float(value)
    return None


def _norm(path: str) -> str:
    return norm_path(path)


# Why a damaged checkpoint is kept, and why an abandoned one is dropped (as `ckpt ls` shows them).
DAMAGED_REASON = "damaged: manifest unreadable, never latest; kept while newer than the latest readable checkpoint"
ABANDONED_REASON = "abandoned timeline (newer than the step the run went back to); pin it to keep it"


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as retention sees it. `error` says why its manifest could not be read (a damaged
    checkpoint: never latest, never ranked; kept while newer than the latest readable one). `abandoned`: set aside as an abandoned
    timeline (ckpt/retention/timeline.py): only a pin or a caller's protection keeps it."""

    step: int
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    created_utc: str | None = None
    nbytes: int | None = None
    pinned: bool = False
    error: str | None = None
    abandoned: bool = False


@dataclass(frozen=True)
class BestCheckpoint:
    """One of the best checkpoints: its place (1 = best), and the metric it was ranked by."""

    rank: int
    step: int
    path: str
    metric: str
    value: float
    metrics: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RetentionRule(Protocol):
    """A rule returns, for each checkpoint it keeps (by path), why it keeps it.

    `checkpoints` are the run's committed, readable checkpoints on its current timeline, oldest first. A rule
    is a pure function of them (no deleting, no I/O), so every process that reads the run reaches the same
    answer. Pass user rules as `RetentionPolicy(extra_rules=[...])`; docs/extending.md has an example.
    """

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]: ...


@dataclass(frozen=True)
class KeepLatest:
    """The newest `n` checkpoints; every checkpoint when `n` is None."""

    n: int | None

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]:
        if self.n is None:
            return {c.path: "latest" if i == len(checkpoints) - 1 else "no save_total_limit"
                    for i, c in enumerate(checkpoints)}
        return {c.path: "latest" for c in checkpoints[max(0, len(checkpoints) - self.n):]}  # n may exceed the count


@dataclass(frozen=True)
class KeepBest:
    """The `n` best by `metric`. Ties go to the older checkpoint; non-finite or missing values never count."""

    n: int
    metric: str
    greater_is_better: bool

    def ranking(self, checkpoints: Sequence[CheckpointInfo], n: int | None = None) -> list[BestCheckpoint]:
        scored = []
        for c in checkpoints:
            found = metric_value(c.metrics, self.metric)
            if found is not None:
                name, value = found
                scored.append(((-value if self.greater_is_better else value, c.step), name, value, c))
        scored.sort(key=lambda item: item[0])
        limit = self.n if n is None else n
        return [BestCheckpoint(i + 1, c.step, c.path, name, value, dict(c.metrics))
                for i, (_, name, value, c) in enumerate(scored[:limit])]

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]:
        return {b.path: f"best #{b.rank} ({b.metric}={b.value:.4g})" for b in self.ranking(checkpoints)}


@dataclass(frozen=True)
class KeepEveryNSteps:
    """Every checkpoint whose step is a multiple of `n`."""

    n: int

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]:
        return {c.path: f"every {self.n} steps" for c in checkpoints if c.step % self.n == 0}


@dataclass(frozen=True)
class KeepPinned:
    """Checkpoints holding a PINNED file."""

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]:
        return {c.path: "pinned" for c in checkpoints if c.pinned}


@dataclass(frozen=True)
class KeepPaths:
    """Checkpoints protected by the caller (the one resumed from, one being loaded), path -> reason."""

    paths: Mapping[str, str]

    def keep_reasons(self, checkpoints: Sequence[CheckpointInfo]) -> dict[str, str]:
        wanted = {_norm(p): why for p, why in self.paths.items()}
        return {c.path: wanted[_norm(c.path)] for c in checkpoints if _norm(c.path) in wanted}


@dataclass(frozen=True)
class CheckpointDecision:
    """Keep or drop one checkpoint: why it is kept (`reasons`), or why it goes (`drop_reason`)."""

    step: int
    path: str
    keep: bool
    reasons: tuple[str, ...]
    drop_reason: str | None = None


@dataclass(frozen=True)
class RetentionDecision:
    """One decision per committed checkpoint (oldest first), and the best ones in order."""

    checkpoints: tuple[CheckpointDecision, ...]
    best: tuple[BestCheckpoint, ...] = ()

    @property
    def kept(self) -> tuple[CheckpointDecision, ...]:
        return tuple(c for c in self.checkpoints if c.keep)

    @property
    def dropped(self) -> tuple[CheckpointDecision, ...]:
        return tuple(c for c in self.checkpoints if not c.keep)

    def to_plain(self) -> dict[str, Any]:
        """Plain data (for msgpack between ranks, and `--json`)."""
        return {
            "checkpoints": [{"step": c.step, "path": c.path, "keep": c.keep, "reasons": list(c.reasons),
                             "drop_reason": c.drop_reason} for c in self.checkpoints],
            "best": [{"rank": b.rank, "step": b.step, "path": b.path, "metric": b.metric, "value": b.value,
                      "metrics": b.metrics} for b in self.best],
        }

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> RetentionDecision:
        return cls(
            checkpoints=tuple(CheckpointDecision(c["step"], c["path"], c["keep"], tuple(c["reasons"]),
                                                 c["drop_reason"]) for c in data["checkpoints"]),
            best=tuple(BestCheckpoint(b["rank"], b["step"], b["path"], b["metric"], b["value"], dict(b["metrics"]))
                       for b in data["best"]),
        )


def _optional_int(owner: str, name: str, value: Any, minimum: int, meaning: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{owner}: {name}={value!r} must be an int >= {minimum} ({meaning}), or None to turn "
                         "the rule off")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints a run keeps. A checkpoint is kept when any rule keeps it.

    The newest checkpoint is always kept; pinned checkpoints and ones the caller protects (the one a run
    resumed from, one being loaded) are never dropped.
    """

    save_total_limit: int | None = None
    """Keep the newest K committed checkpoints; None keeps all (and nothing is ever deleted)."""
    preserve_n_best: int | None = None
    """Also keep the N best by `best_model_metric` (so up to K + N in all); None or 0 turns this off."""
    best_model_metric: str | None = None
    """Metric to rank by, looked up in each manifest's metrics as given, then with an `eval_` prefix."""
    best_model_greater_is_better: bool | None = None
    """Direction; None infers it from the metric's name (an unrecognised name is an error)."""
    keep_every_n_steps: int | None = None
    """Also keep every checkpoint whose step is a multiple of this."""
    metric_for_best_model: str | None = None
    """Hugging Face's name for `best_model_metric`; after construction both hold the metric in force."""
    greater_is_better: bool | None = None
    """Hugging Face's name for `best_model_greater_is_better`. After construction it holds the direction in
    force: as given, or inferred once from the metric's name."""
    extra_rules: tuple[RetentionRule, ...] = ()
    """User rules (anything with `keep_reasons(checkpoints) -> {path: reason}`), consulted next to the
    built-in ones; a checkpoint any of them keeps is kept. Not recorded in retention_policy.json."""

    def __post_init__(self) -> None:
        name = "RetentionPolicy"
        self._resolve_aliases(name)
        _optional_int(name, "save_total_limit", self.save_total_limit, 1, "how many of the newest to keep")
        _optional_int(name, "preserve_n_best", self.preserve_n_best, 0, "how many of the best to keep")
        _optional_int(name, "keep_every_n_steps", self.keep_every_n_steps, 1, "a step interval")
        metric = self.best_model_metric
        if metric is not None and (not isinstance(metric, str) or not metric.strip()):
            raise ValueError(f"{name}: best_model_metric={metric!r} must be a metric name such as 'eval_loss', "
                             "or None")
        if self.preserve_n_best and metric is None:
            raise ValueError(f"{name}: preserve_n_best={self.preserve_n_best} needs best_model_metric, the metric "
                             "to rank checkpoints by (e.g. best_model_metric='eval_loss')")
        direction = self.best_model_greater_is_better
        if direction is not None and not isinstance(direction, bool):
            raise ValueError(f"{name}: best_model_greater_is_better={direction!r} must be True, False or None "
                             "(infer from the metric name)")
        if metric is not None and direction is None and infer_greater_is_better(metric) is None:
            raise ValueError(
                f"{name}: cannot tell from best_model_metric={metric!r} whether higher or lower is better; pass "
                "best_model_greater_is_better=True (higher is better) or False (lower is better)")
        for rule in self.extra_rules:
            if not callable(getattr(rule, "keep_reasons", None)):
                raise ValueError(f"{name}: extra_rules holds {rule!r}, which has no keep_reasons(checkpoints) "
                                 "method; a rule returns {path: reason} for the checkpoints it keeps")
        inferred = infer_greater_is_better(metric) if metric is not None and direction is None else None
        object.__setattr__(self, "greater_is_better", direction if direction is not None else inferred)

    def _resolve_aliases(self, name: str) -> None:
        """Merge each option with its Hugging Face name, once; different values for both are an error."""
        object.__setattr__(self, "extra_rules", tuple(self.extra_rules))
        pairs = (("best_model_metric", "metric_for_best_model"), ("best_model_greater_is_better", "greater_is_better"))
        for ours, theirs in pairs:
            mine, hf = getattr(self, ours), getattr(self, theirs)
            if mine is not None and hf is not None and mine != hf:
                raise ValueError(f"{name}: {ours}={mine!r} and {theirs}={hf!r} name the same option with different "
                                 "values; give only one of them")
            value = mine if mine is not None else hf
            object.__setattr__(self, ours, value)
            object.__setattr__(self, theirs, value)

    def best_rule(self, n: int | None = None) -> KeepBest | None:
        n = self.preserve_n_best if n is None else n
        if self.best_model_metric is None:
            return None
        return KeepBest(n or 0, self.best_model_metric, bool(self.greater_is_better))

    def rules(self, protected: Mapping[str, str] | None = None) -> list[RetentionRule]:
        """The rules this policy combines, in the order their reasons are listed."""
        rules: list[RetentionRule] = [KeepLatest(self.save_total_limit)]
        best = self.best_rule()
        if best is not None and best.n > 0:
            rules.append(best)
        if self.keep_every_n_steps is not None:
            rules.append(KeepEveryNSteps(self.keep_every_n_steps))
        rules.extend(self.extra_rules)
        rules.append(KeepPinned())
        if protected:
            rules.append(KeepPaths(dict(protected)))
        return rules

    def decide(self, checkpoints: Sequence[CheckpointInfo], protected: Mapping[str, str] | None = None
               ) -> RetentionDecision:
        """Keep or drop each committed checkpoint. `protected`: path -> reason, never dropped."""
        ordered = sorted(checkpoints, key=lambda c: (c.step, c.path))
        # The run's timeline: what "latest", best-N and every-N speak of. Damaged and abandoned checkpoints are
        # outside it; only pins and the caller's protection reach them.
        live = [c for c in ordered if not c.abandoned and c.error is None]
        reasons: dict[str, list[str]] = {c.path: [] for c in ordered}
        for rule in self.rules(protected):
            pool = ordered if isinstance(rule, KeepPinned | KeepPaths) else live
            for path, why in rule.keep_reasons(pool).items():
                reasons[path].append(why)
        for c in ordered:  # a damaged one newer than the latest readable one may be a passing read error: kept
            if c.error is not None and not c.abandoned and (not live or c.step > live[-1].step):
                reasons[c.path].append(DAMAGED_REASON)
        if live and not reasons[live[-1].path]:  # unreachable with KeepLatest; kept as a guarantee
            reasons[live[-1].path].append("latest")
        best = self.best_rule()
        decisions = tuple(
            CheckpointDecision(c.step, c.path, bool(reasons[c.path]), tuple(reasons[c.path]),
                               None if reasons[c.path] else self._drop_reason(c))
            for c in ordered)
        return RetentionDecision(decisions, tuple(best.ranking(live)) if best and best.n else ())

    def _drop_reason(self, c: CheckpointInfo) -> str:
        if c.abandoned:
            return ABANDONED_REASON
        if c.error is not None:
            return "damaged: manifest unreadable, older than the latest readable checkpoint"
        k, n = self.save_total_limit, self.preserve_n_best
        parts = ["not the newest" if k == 1 else f"not among the newest {k}"]
        if self.best_model_metric is not None and n:
            found = metric_value(c.metrics, self.best_model_metric)
            value = f"{found[0]}={found[1]:.4g}" if found else f"no finite {self.best_model_metric}"
            best = "not the best" if n == 1 else f"not among the {n} best"
            parts.append(f"{best} by {self.best_model_metric} ({value})")
        if self.keep_every_n_steps is not None:
            parts.append(f"step not a multiple of {self.keep_every_n_steps}")
        if self.extra_rules:
            parts.append("kept by no extra rule")
        return ", ".join(parts)

    def describe(self) -> str:
        """One line for logs and summaries."""
        parts = [f"save_total_limit={self.save_total_limit}"]
        if self.best_model_metric is not None:
            way = "higher" if self.greater_is_better else "lower"
            if self.preserve_n_best:
                parts.append(f"preserve_n_best={self.preserve_n_best} by {self.best_model_metric} ({way} is better)")
            else:  # the metric still ranks coord.best(); no checkpoint is kept for it
                parts.append(f"no best-N rule (best_model_metric={self.best_model_metric}, {way} is better)")
        if self.keep_every_n_steps is not None:
            parts.append(f"keep_every_n_steps={self.keep_every_n_steps}")
        return ", ".join(parts)

    def to_plain(self) -> dict[str, Any]:
        return {"save_total_limit": self.save_total_limit, "preserve_n_best": self.preserve_n_best,
                "best_model_metric": self.best_model_metric,
                "best_model_greater_is_better": self.best_model_greater_is_better,
                "keep_every_n_steps": self.keep_every_n_steps}

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> RetentionPolicy:
        known = {**cls().to_plain(), "metric_for_best_model": None, "greater_is_better": None}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"RetentionPolicy: unknown options {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


__all__ = ["BestCheckpoint", "CheckpointDecision", "CheckpointInfo", "KeepBest", "KeepEveryNSteps", "KeepLatest",
           "KeepPaths", "KeepPinned", "RetentionDecision", "RetentionPolicy", "RetentionRule",
           "infer_greater_is_better", "metric_value"]
