"""What a run directory holds, as retention sees it, and carrying out a retention decision.

Reads committed checkpoints with their manifests' metrics and pins, keeps the run's recorded policy,
tracks checkpoints this process is reading, and deletes what a decision drops (rank 0 only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from ..format.layout import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    PIN_NAME,
    list_abandoned,
    list_checkpoints,
    resolve_checkpoint,
)
from ..format.manifest_read import read_manifest
from ..io.storage import Storage, norm_path, parent_of
from .rules import (
    BestCheckpoint,
    CheckpointInfo,
    RetentionDecision,
    RetentionPolicy,
    infer_greater_is_better,
)

log = logging.getLogger("ckpt")

POLICY_NAME = "retention_policy.json"  # the run's policy, written by rank 0, read by `ckpt ls` / `ckpt prune`
DELETING_SUFFIX = ".deleting" + PARTIAL_SUFFIX  # a checkpoint on its way out: never loaded, cleaned by a save

_held: dict[str, list[str]] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def hold(path: str, why: str) -> Iterator[None]:
    """Protect `path` from deletion by retention in this process while the block runs."""
    key = norm_path(path)
    with _held_lock:
        _held.setdefault(key, []).append(why)
    try:
        yield
    finally:
        with _held_lock:
            _held[key].remove(why)
            if not _held[key]:
                del _held[key]


def held() -> dict[str, str]:
    """Checkpoints this process is reading or writing now: path -> why."""
    with _held_lock:
        return {path: whys[0] for path, whys in _held.items()}


def read_info(storage: Storage, step: int, path: str, abandoned: bool = False) -> CheckpointInfo:
    """A committed checkpoint's step, metrics, time and size; an unreadable manifest gives `error`."""
    pinned = storage.exists(os.path.join(path, PIN_NAME))
    try:
        m = read_manifest(storage, path)
    except (CheckpointError, OSError) as exc:
        return CheckpointInfo(step, path, pinned=pinned, error=str(exc), abandoned=abandoned)
    nbytes = sum(f.nbytes for c in m.components.values() for f in c.files)
    return CheckpointInfo(step, path, dict(m.metrics), m.created_utc, nbytes, pinned, abandoned=abandoned)


def scan(storage: Storage, run_dir: str, *, abandoned: bool = False) -> list[CheckpointInfo]:
    """Every committed checkpoint of the run, oldest first (with `abandoned`, those of abandoned timelines too).
    Folders with other names are not looked at."""
    infos = [read_info(storage, ref.step, ref.path) for ref in list_checkpoints(storage, run_dir)]
    if abandoned:
        infos += [read_info(storage, ref.step, ref.path, True) for ref in list_abandoned(storage, run_dir)]
    return infos


def best(storage: Storage, run_dir: str, policy: RetentionPolicy, n: int | None = None) -> list[BestCheckpoint]:
    rule = policy.best_rule(n)
    if rule is None:
        raise ValueError("best(): the retention policy has no best_model_metric; set one "
                         "(RetentionPolicy(best_model_metric='eval_loss', ...)) to rank checkpoints")
    return rule.ranking(scan(storage, run_dir), rule.n or 1)


# ---- pins ----------------------------------------------------------------------------------------

def committed_dir(storage: Storage, path: str) -> str:
    """`path` if it is a committed checkpoint; an error naming what it is otherwise."""
    return resolve_checkpoint(storage, parent_of(path), norm_path(path)).path


def pin_checkpoint(storage: Storage, path: str) -> bool:
    """Protect a checkpoint from every retention rule. Returns False when it was already pinned."""
    target = os.path.join(committed_dir(storage, path), PIN_NAME)
    if storage.exists(target):
        return False
    storage.write_file(target, [b""])
    storage.fsync_dir(os.path.dirname(target))
    return True


def unpin_checkpoint(storage: Storage, path: str) -> bool:
    """Remove a pin. Returns False when the checkpoint was not pinned."""
    target = os.path.join(committed_dir(storage, path), PIN_NAME)
    if not storage.exists(target):
        return False
    storage.remove_file(target)
    storage.fsync_dir(os.path.dirname(target))
    return True


# ---- the run's recorded policy -------------------------------------------------------------------

def read_policy(storage: Storage, run_dir: str) -> RetentionPolicy | None:
    """The policy the run last saved with, or None when it never had one."""
    path = os.path.join(run_dir, POLICY_NAME)
    if not storage.exists(path):
        return None
    try:
        with storage.open_read(path) as f:
            return RetentionPolicy.from_plain(json.loads(f.read()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid retention policy ({exc}); delete it or pass the policy "
                              "options explicitly", path=path) from None


def write_policy(storage: Storage, run_dir: str, policy: RetentionPolicy) -> None:
    """Record the policy for offline tools (in one step: `replace_file`); nothing is written when it is unchanged."""
    path = os.path.join(run_dir, POLICY_NAME)
    with contextlib.suppress(CheckpointError):
        if read_policy(storage, run_dir) == policy:
            return
    storage.replace_file(path, (json.dumps(policy.to_plain(), indent=1) + "\n").encode())


# ---- a policy given in part (the `ckpt` command's flags) ----------------------------------------

CLI, RECORDED = "command line", "recorded by the run"


@dataclass(frozen=True)
class AppliedPolicy:
    """The policy `ckpt ls`/`prune` apply, where each of its options came from, and a summary of that."""

    policy: RetentionPolicy | None
    sources: dict[str, str]  # option -> CLI or RECORDED, for the options that are set or were given
    source: str

    def text(self) -> str:
        return f"{self.policy.describe()} ({self.source})" if self.policy else self.source


def layer_policy(storage: Storage, run_dir: str, given: Mapping[str, Any], flags: Mapping[str, str]
                 ) -> AppliedPolicy:
    """The run's recorded policy with the `given` options laid over it. `flags` names each option as the
    caller's user typed it (for messages). A 0 for keep_every_n_steps turns that rule off; a new metric
    drops the recorded direction (it belonged to the recorded metric)."""
    recorded = read_policy(storage, run_dir)
    fields = (recorded or RetentionPolicy()).to_plain()
    sources = {k: RECORDED for k, v in fields.items() if v is not None}
    if not given:
        return AppliedPolicy(recorded, sources, RECORDED if recorded else "the run recorded none: nothing is deleted")
    if given.get("best_model_metric", fields["best_model_metric"]) != fields["best_model_metric"]:
        fields["best_model_greater_is_better"] = None
        sources.pop("best_model_greater_is_better", None)
    for key, value in given.items():
        fields[key] = None if key == "keep_every_n_steps" and value == 0 else value
        sources[key] = CLI
    _check_layered(fields, sources, flags, os.path.join(run_dir, POLICY_NAME))
    named = [flags[k] if k != "best_model_greater_is_better" or given[k] else "--lower-is-better"
             for k in flags if k in given]
    source = CLI if RECORDED not in sources.values() else (
        f"{', '.join(named)} from the command line, the rest {RECORDED} in {POLICY_NAME}")
    return AppliedPolicy(RetentionPolicy(**fields), sources, source)


def _check_layered(fields: dict[str, Any], sources: dict[str, str], flags: Mapping[str, str], recorded_at: str
                   ) -> None:
    """RetentionPolicy's checks, worded with the caller's flags (or the file an option was recorded in)."""
    def name(key: str) -> str:
        value = fields[key]
        return f"{flags[key]} {value}" if sources.get(key) == CLI else f"{key}={value!r} (recorded in {recorded_at})"

    k, n, metric = fields["save_total_limit"], fields["preserve_n_best"], fields["best_model_metric"]
    metric_flag = flags["best_model_metric"]
    if k is not None and k < 1:
        raise ValueError(f"{name('save_total_limit')} must be at least 1 (the newest checkpoint is always kept)")
    if n is not None and n < 0:
        raise ValueError(f"{name('preserve_n_best')} must be 0 or more (0 turns the best-N rule off)")
    if (fields["keep_every_n_steps"] or 0) < 0:
        raise ValueError(f"{name('keep_every_n_steps')} must be 1 or more (0 turns the rule off)")
    if metric is not None and not metric.strip():
        raise ValueError(f"{metric_flag} needs a metric name, such as {metric_flag} eval_loss")
    if n and metric is None:
        raise ValueError(f"{name('preserve_n_best')} needs {metric_flag} M, the metric to rank checkpoints by "
                         f"(e.g. {metric_flag} eval_loss)")
    if metric is not None and fields["best_model_greater_is_better"] is None and infer_greater_is_better(metric) is None:
        raise ValueError(f"cannot tell from {name('best_model_metric')} whether higher or lower is better; pass "
                         "--greater-is-better or --lower-is-better")


# ---- deleting ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionOutcome:
    """What applying a decision did: the decision, the folders deleted, and deletions that failed."""

    decision: RetentionDecision
    deleted: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (path, error)

    def to_plain(self) -> dict:
        return {"decision": self.decision.to_plain(), "deleted": list(self.deleted),
                "failed": [list(f) for f in self.failed]}

    @classmethod
    def from_plain(cls, data: Mapping) -> RetentionOutcome:
        return cls(RetentionDecision.from_plain(data["decision"]), tuple(data["deleted"]),
                   tuple((p, e) for p, e in data["failed"]))


def delete_checkpoint(storage: Storage, path: str) -> None:
    """Uncommit first (an atomic rename to a name that is never loaded; on a store without rename, deleting
    the manifest), then remove the files, so a crash part way never leaves a committed checkpoint with files
    missing (what is left is an unfinished save, which the run dir's next owner removes)."""
    if not storage.renames:
        storage.remove_file(os.path.join(path, MANIFEST_NAME))
        storage.remove_tree(path)
        return
    doomed = os.path.normpath(path) + DELETING_SUFFIX
    storage.remove_tree(doomed)
    storage.rename(path, doomed)
    storage.fsync_dir(os.path.dirname(os.path.normpath(path)) or ".")
    storage.remove_tree(doomed)


def apply_decision(storage: Storage, decision: RetentionDecision, dry_run: bool = False) -> RetentionOutcome:
    """Delete every checkpoint the decision drops, logging each once with its reason.

    A checkpoint pinned, or taken up by a reader in this process, since the decision was made is spared.
    """
    deleted, failed = [], []
    for c in decision.dropped:
        busy = held().get(norm_path(c.path))
        if busy or storage.exists(os.path.join(c.path, PIN_NAME)) or not storage.exists(
                os.path.join(c.path, MANIFEST_NAME)):
            log.info("retention: keeping %s after all (%s)", c.path, busy or "pinned or already gone")
            continue
        if dry_run:
            deleted.append(c.path)
            continue
        try:
            delete_checkpoint(storage, c.path)
        except OSError as exc:
            log.warning("retention: could not delete %s: %s", c.path, exc)
            failed.append((c.path, f"{type(exc).__name__}: {exc}"))
            continue
        log.info("retention: deleted %s: %s", c.path, c.drop_reason)
        deleted.append(c.path)
    return RetentionOutcome(decision, tuple(deleted), tuple(failed))


def human_size(n: float | None) -> str:
    """Bytes as a short decimal size: 512 B, 66.8 kB, 1.2 GB."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def summary_text(run_dir: str, policy: RetentionPolicy | None, decision: RetentionDecision,
                 infos: list[CheckpointInfo]) -> str:
    """The end-of-training report: the best checkpoints with their metric, the latest, what is kept."""
    lines = [f"Checkpoints in {run_dir}" + (f" (retention: {policy.describe()})" if policy else "")]
    if not decision.checkpoints:
        return lines[0] + "\n  none committed\n"
    if decision.best:
        lines.append(f"Best by {policy.best_model_metric if policy else decision.best[0].metric}:")
        lines += [f"  #{b.rank}  {os.path.basename(b.path)}  step {b.step}  {b.metric}={b.value:.6g}"
                  for b in decision.best]
    latest = next((c for c in reversed(decision.checkpoints) if "latest" in c.reasons), decision.checkpoints[-1])
    lines.append(f"Latest: {os.path.basename(latest.path)} (step {latest.step})")
    size = sum(i.nbytes or 0 for i in infos if i.path in {c.path for c in decision.kept})
    lines.append(f"Kept: {len(decision.kept)} checkpoints, {human_size(size)}")
    width = max(len(os.path.basename(c.path)) for c in decision.kept)
    lines += [f"  {os.path.basename(c.path):<{width}}  {', '.join(c.reasons)}" for c in decision.kept]
    return "\n".join(lines) + "\n"


def retain(storage: Storage, run_dir: str, policy: RetentionPolicy, protected: Mapping[str, str]) -> RetentionOutcome:
    """Apply `policy` to the run after a commit: record it, decide from disk, then delete what it drops."""
    write_policy(storage, run_dir, policy)
    decision = policy.decide(scan(storage, run_dir, abandoned=True), {**held(), **protected})
    return apply_decision(storage, decision)
