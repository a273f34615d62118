"""The `ckpt` commands about which checkpoints a run keeps: `ls` (the retention decision for every checkpoint),
`prune` (carry it out, under the run dir's lock), `pin` and `unpin`, and the policy flags they share."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, RunDirInUseError
from ..format.layout import MANIFEST_NAME, REPLACED_SUFFIX, list_partials, parse_step
from ..io.lease import LeaseLock
from ..io.lock import RunDirLock, acquire
from ..io.storage import is_url, norm_path, storage_for, tree_bytes
from ..retention.catalog import (
    AppliedPolicy,
    apply_decision,
    human_size,
    layer_policy,
    pin_checkpoint,
    scan,
    unpin_checkpoint,
)
from ..retention.rules import CheckpointInfo, RetentionDecision, RetentionPolicy
from .inspection import open_checkpoint
from .output import EXIT_ERROR, EXIT_FOUND, EXIT_OK, emit, metrics_text, print_json, table, time_text

# ---- policy for ls / prune -----------------------------------------------------------------------

def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retention policy (default: the one the run recorded in retention_policy.json; "
                             "flags given replace only those parts of it)")
    g.add_argument("--save-total-limit", type=int, metavar="K", help="keep the newest K checkpoints")
    g.add_argument("--preserve-n-best", type=int, metavar="N", help="also keep the N best by --metric (0: off)")
    g.add_argument("--metric", "--metric-for-best-model", dest="metric", metavar="M",
                   help="metric to rank by (looked up as given, then as eval_M)")
    way = g.add_mutually_exclusive_group()
    way.add_argument("--greater-is-better", dest="greater", action="store_true", default=None,
                     help="higher values of --metric are better")
    way.add_argument("--lower-is-better", dest="greater", action="store_false", help="lower values are better")
    g.add_argument("--keep-every-n-steps", type=int, metavar="S",
                   help="also keep steps that are multiples of S (0: off)")


_FLAGS = {"save_total_limit": "--save-total-limit", "preserve_n_best": "--preserve-n-best",
          "best_model_metric": "--metric", "best_model_greater_is_better": "--greater-is-better",
          "keep_every_n_steps": "--keep-every-n-steps"}


def _policy(args: argparse.Namespace, run_dir: str) -> AppliedPolicy:
    """The run's recorded policy with the options given on the command line laid over it."""
    given = {"save_total_limit": args.save_total_limit, "preserve_n_best": args.preserve_n_best,
             "best_model_metric": args.metric, "best_model_greater_is_better": args.greater,
             "keep_every_n_steps": args.keep_every_n_steps}
    return layer_policy(storage_for(run_dir), run_dir, {k: v for k, v in given.items() if v is not None}, _FLAGS)


def _run_dir(path: str) -> str:
    if is_url(path):
        path, storage = norm_path(path), storage_for(path)
        if not storage.is_dir(path):
            raise CheckpointNotFoundError(f"{path} does not exist (no objects under that prefix)", path=path)
        if storage.exists(f"{path}/{MANIFEST_NAME}"):
            raise CheckpointNotFoundError(f"{path} is a checkpoint, not a run directory; use `ckpt inspect {path}`",
                                          path=path)
        return path
    path = os.path.normpath(path)
    if os.path.basename(path) == MANIFEST_NAME and os.path.isfile(path):
        run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        raise CheckpointNotFoundError(f"{path} is a checkpoint's manifest file, not a run directory; list its run with "
                                      f"`ckpt ls {run}`", path=path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path} is not a folder" if os.path.exists(path) else f"{path} does not exist",
                                      path=path)
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        raise CheckpointNotFoundError(f"{path} is a checkpoint, not a run directory; use `ckpt inspect {path}`, or "
                                      f"list its run with `ckpt ls {os.path.dirname(path) or '.'}`", path=path)
    return path


def _decide(run_dir: str, policy: RetentionPolicy | None) -> tuple[list[CheckpointInfo], RetentionDecision, set]:
    """The decision now, and which kept checkpoints the next save (without a new best) would drop."""
    infos = scan(storage_for(run_dir), run_dir, abandoned=True)
    decision = (policy or RetentionPolicy()).decide(infos)
    next_to_go: set[str] = set()
    if policy is not None and infos:
        phantom = CheckpointInfo(max(i.step for i in infos) + 1, os.path.join(run_dir, "(next save)"))
        later = policy.decide([*infos, phantom])
        next_to_go = {c.path for c in later.dropped} - {c.path for c in decision.dropped}
    return infos, decision, next_to_go


# ---- subcommands ---------------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args.run_dir)
    applied = _policy(args, run_dir)
    policy = applied.policy
    infos, decision, next_to_go = _decide(run_dir, policy)
    by_path = {c.path: c for c in decision.checkpoints}
    rows = []
    for info in infos:
        d = by_path[info.path]
        rows.append({"name": os.path.relpath(info.path, run_dir), "path": info.path, "step": info.step,
                     "created_utc": info.created_utc, "nbytes": info.nbytes, "metrics": info.metrics,
                     "pinned": info.pinned, "partial": False, "keep": d.keep, "reasons": list(d.reasons),
                     "drop_reason": d.drop_reason, "next_to_go": info.path in next_to_go, "error": info.error,
                     "damaged": info.error is not None, "abandoned": info.abandoned})
    for path in sorted(list_partials(storage_for(run_dir), run_dir)):
        name = os.path.basename(path)
        rows.append({"name": name, "path": path, "step": parse_step(name.split(".", 1)[0]), "created_utc": None,
                     "nbytes": tree_bytes(storage_for(path), path), "metrics": {}, "pinned": False, "partial": True, "keep": False,
                     "reasons": [], "drop_reason": _partial_status(name),
                     "next_to_go": False, "error": None, "damaged": False, "abandoned": False})
    damaged = [r["name"] for r in rows if r["damaged"]]
    status = EXIT_FOUND if args.check and damaged else EXIT_OK
    live = sum(not i.abandoned for i in infos)
    if args.json:
        print_json({"run_dir": run_dir, **_policy_plain(applied), "checkpoints": rows,
               "best": decision.to_plain()["best"], "damaged": damaged})
        return status
    emit(f"{run_dir}: {live} committed checkpoints" + (f" and {len(infos) - live} of abandoned timelines"
                                                       if len(infos) > live else "") + f"; policy: {applied.text()}")
    if rows:
        emit(table(["CHECKPOINT", "STEP", "CREATED (UTC)", "SIZE", "METRICS", "STATUS"],
                   [[r["name"], r["step"], time_text(r["created_utc"]), human_size(r["nbytes"]),
                     "manifest unreadable" if r["error"] else metrics_text(r["metrics"]), _status(r)] for r in rows],
                   right=(1, 3)))
    if damaged:
        emit(f"damaged (manifest unreadable): {', '.join(damaged)}; `ckpt inspect` says why. Retention never counts "
             "one as the newest; a load of \"latest\" refuses a damaged newest one unless fallback=True")
    return status


def _policy_plain(applied: AppliedPolicy) -> dict[str, Any]:
    return {"policy": applied.policy.to_plain() if applied.policy else None, "policy_source": applied.source,
            "policy_sources": applied.sources}


def _status(r: dict) -> str:
    if r["partial"]:
        return "PARTIAL: " + r["drop_reason"]
    prefix = "ABANDONED, " if r["abandoned"] else "DAMAGED, " if r["damaged"] else ""
    if not r["keep"]:
        return prefix + "would delete: " + r["drop_reason"]
    return prefix + "keep: " + ", ".join(r["reasons"]) + (" (next to go)" if r["next_to_go"] else "")


def _lock_run_dir(run_dir: str, args: argparse.Namespace) -> tuple[RunDirLock | LeaseLock | None, dict | None]:
    """Take the run dir's lock, as a live job's coordinator holds it: (our hold, None), or (None, the holder)
    when another process holds it and this is a dry run or --force. Otherwise an error naming the holder."""
    try:
        return acquire(storage_for(run_dir), run_dir), None
    except RunDirInUseError as exc:
        if args.dry_run or args.force:
            return None, exc.holder or {"pid": None}
        raise CheckpointError(
            f"{run_dir} is in use by a live job: {_holder_text(exc.holder)} holds its lock ({exc.path}); pruning "
            "now could delete the checkpoint that job resumed from or is loading. Let the job's own saves apply "
            "its policy, or stop it first; pass --force to prune anyway", path=run_dir) from None
    except OSError as exc:  # a read-only run dir: nothing can be deleted there either
        if args.dry_run or args.force:
            return None, None
        raise CheckpointError(f"cannot take {run_dir}'s lock to prune it ({exc}); pass --force to prune without "
                              "it", path=run_dir) from None


def _holder_text(holder: dict | None) -> str:
    if not holder or holder.get("pid") is None:
        return "another process (it left no details)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} (started {holder.get('started_utc', '?')})"


def cmd_prune(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args.run_dir)
    applied = _policy(args, run_dir)
    policy = applied.policy
    if policy is None:
        raise CheckpointError(f"{run_dir} has no recorded retention policy; pass one, e.g. --save-total-limit 3 "
                              "--preserve-n-best 2 --metric eval_loss")
    lock, holder = _lock_run_dir(run_dir, args)
    try:
        _, decision, _ = _decide(run_dir, policy)
        outcome = apply_decision(storage_for(run_dir), decision, dry_run=args.dry_run)
    finally:
        if lock is not None:
            lock.release()
    reasons = {c.path: c.drop_reason for c in decision.dropped}
    if args.json:
        print_json({"run_dir": run_dir, **_policy_plain(applied), "dry_run": args.dry_run,
               "lock_holder": holder, "forced": holder is not None and not args.dry_run,
               "deleted": [{"path": p, "reason": reasons[p]} for p in outcome.deleted],
               "failed": [{"path": p, "error": e} for p, e in outcome.failed],
               "kept": [{"path": c.path, "reasons": list(c.reasons)} for c in decision.kept]})
        return EXIT_ERROR if outcome.failed else EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    if holder is not None:
        sys.stderr.write(f"warning: {_holder_text(holder)} holds {run_dir}'s lock (a live job); "
                         + ("a prune without --dry-run is refused unless --force\n" if args.dry_run else
                            "pruning anyway (--force): that job's resumed-from checkpoint is not protected\n"))
    emit(f"policy: {applied.text()}")
    rows = [[verb, os.path.basename(p), reasons[p]] for p in outcome.deleted]
    rows += [["FAILED", os.path.basename(p), e] for p, e in outcome.failed]
    rows += [["keep", os.path.basename(c.path), ", ".join(c.reasons)] for c in decision.kept]
    emit(table(["ACTION", "CHECKPOINT", "WHY"], rows))
    emit(f"{len(outcome.deleted)} {verb}, {len(decision.kept)} kept" + (" (dry run: nothing was deleted)"
                                                                      if args.dry_run else ""))
    return EXIT_ERROR if outcome.failed else EXIT_OK


def pin_command(pin: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        ck = open_checkpoint(args.checkpoint)
        changed = (pin_checkpoint if pin else unpin_checkpoint)(ck.storage, ck.path)
        if args.json:
            print_json({"path": ck.path, "pinned": pin, "changed": changed})
        else:
            word = "pinned" if pin else "unpinned"
            emit(f"{word} {ck.path}" if changed else f"{ck.path} was already {word}")
        return EXIT_OK
    return run


def _partial_status(name: str) -> str:
    if name.endswith(REPLACED_SUFFIX):
        return "set aside by an interrupted overwrite: the next coordinator of the run dir puts it back"
    return "unfinished save: never loaded, removed by the next save"
