"""The `ckpt` command: list, inspect, verify, diff, export, import, prune and pin checkpoints, and report a run
(see docs/cli.md). Export to other formats, import and report live in their own modules (export_formats.py,
importing.py, report.py) and are hooked in here.

Every subcommand takes `--json`. Errors are one line on stderr with exit status 2 (`verify` exits 1 when
the checkpoint would not load, `diff` exits 1 when the checkpoints differ, `ls --check` exits 1 when a
manifest is unreadable, and any command reading a checkpoint exits 3 when it was deleted while being read);
with `--json` the error is `{"error": ...}` on stdout instead, with the same status. Pass --debug (or set
CKPT_DEBUG=1) to see a traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import CheckpointDeletedError, CheckpointError, CheckpointNotFoundError, RunDirInUseError
from ..format.layout import MANIFEST_NAME, REPLACED_SUFFIX, list_partials, parse_step
from ..io.lease import LeaseLock
from ..io.lock import RunDirLock, acquire
from ..io.storage import is_url, norm_path, storage_for, tree_bytes
from ..load.reshape import load_plan, mesh_picture, parse_shape, saved_mesh
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
from .export import export_all, export_component
from .export_formats import add_format_flags, result_lines, run_format
from .importing import add_import_command
from .inspection import Progress, deletion_noticed, describe, diff, open_checkpoint, verify
from .report import add_report_command

EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_DELETED = 0, 1, 2, 3


# ---- output helpers ------------------------------------------------------------------------------

def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()) or "-"


def _time(utc: str | None) -> str:
    return utc.replace("T", " ")[:19] if utc else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Rows as aligned text columns (the last column is not padded)."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        parts[-1] = parts[-1].rstrip() if len(headers) - 1 not in right else parts[-1]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _pairs(rows: Sequence[Sequence[Any]]) -> str:
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k!s:<{width}}  {v}" for k, v in rows)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _json(data: Any) -> None:
    _out(json.dumps(data, indent=1))


def _progress(args: argparse.Namespace, label: str) -> Progress | None:
    """A progress line on stderr, only when a person is watching (stdout is a terminal) and not --json."""
    if args.json or not sys.stdout.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct != last[0]:
            last[0] = pct
            sys.stderr.write(f"\r{label}: {pct:3d}% ({human_size(done)} of {human_size(total)})")
            if done >= total:
                sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    return show


# ---- policy for ls / prune -----------------------------------------------------------------------

def _add_policy_flags(p: argparse.ArgumentParser) -> None:
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
        _json({"run_dir": run_dir, **_policy_plain(applied), "checkpoints": rows,
               "best": decision.to_plain()["best"], "damaged": damaged})
        return status
    _out(f"{run_dir}: {live} committed checkpoints" + (f" and {len(infos) - live} of abandoned timelines"
                                                       if len(infos) > live else "") + f"; policy: {applied.text()}")
    if rows:
        _out(table(["CHECKPOINT", "STEP", "CREATED (UTC)", "SIZE", "METRICS", "STATUS"],
                   [[r["name"], r["step"], _time(r["created_utc"]), human_size(r["nbytes"]),
                     "manifest unreadable" if r["error"] else _metrics(r["metrics"]), _status(r)] for r in rows],
                   right=(1, 3)))
    if damaged:
        _out(f"damaged (manifest unreadable, never loaded as latest): {', '.join(damaged)}; `ckpt inspect` says why")
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
        _json({"run_dir": run_dir, **_policy_plain(applied), "dry_run": args.dry_run,
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
    _out(f"policy: {applied.text()}")
    rows = [[verb, os.path.basename(p), reasons[p]] for p in outcome.deleted]
    rows += [["FAILED", os.path.basename(p), e] for p, e in outcome.failed]
    rows += [["keep", os.path.basename(c.path), ", ".join(c.reasons)] for c in decision.kept]
    _out(table(["ACTION", "CHECKPOINT", "WHY"], rows))
    _out(f"{len(outcome.deleted)} {verb}, {len(decision.kept)} kept" + (" (dry run: nothing was deleted)"
                                                                      if args.dry_run else ""))
    return EXIT_ERROR if outcome.failed else EXIT_OK


def _print_reads(components: list[dict]) -> None:
    """Per SHARDED component and rank: the byte ranges it will read, and how they compare to its shards."""
    for c in components:
        if "reads" not in c:
            continue
        _out()
        _out(f"{c['key']}: bytes each rank reads (every range: --json)")
        rows = []
        for r in c["reads"]:
            spans = "; ".join(f"{os.path.basename(f)} {', '.join(f'{b}..{e}' for b, e in v[:3])}"
                              + (f" (+{len(v) - 3} more ranges)" if len(v) > 3 else "") for f, v in r["ranges"].items())
            rows.append([r["rank"], human_size(r["read_bytes"]), human_size(r["target_bytes"]), spans or "-"])
        _out(table(["RANK", "READS", "ITS SHARDS", "BYTE RANGES"], rows, right=(0, 1, 2)))


def cmd_inspect(args: argparse.Namespace) -> int:
    ck = open_checkpoint(args.checkpoint)
    with deletion_noticed(ck.storage, ck.path, "inspected"):
        info = describe(ck, with_tensors=args.tensors)
    mesh = saved_mesh(ck.manifest)
    info["mesh"] = [{"name": d.name, "size": d.size} for d in mesh] if mesh else None
    if args.at:
        shape = parse_shape(args.at)
        info["load_at"] = {"shape": dict(shape), "components": load_plan(ck.manifest, shape)}
    if args.json:
        _json(info)
        return EXIT_OK
    topo = info["topology"]
    groups = "; ".join(f"{k}={v}" for k, v in topo["process_groups"].items()) or "none"
    _out(_pairs([
        ["checkpoint", info["path"] + ("  (pinned)" if info["pinned"] else "")],
        ["step", info["step"]], ["created", _time(info["created_utc"]) + " UTC"],
        ["size", f"{human_size(info['nbytes'])} in {info['files']} files"], ["metrics", _metrics(info["metrics"])],
        ["topology", f"{topo['world_size']} ranks on {topo['num_nodes']} node(s) of {topo['local_world_size']}, "
                     f"process groups: {groups}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())],
    ]))
    _out()
    _out(table(["COMPONENT", "PATTERN", "GROUP", "VALIDATION", "COPIES", "WRITER RANKS", "FILES", "SIZE", "TENSORS"],
               [[c["key"], c["pattern"], c["process_group"] or "-", c["validation_level"], c["copies"],
                 _ranks(c["writer_ranks"]), c["files"], human_size(c["nbytes"]), c["tensors"]] for c in info["components"]],
               right=(4, 6, 7, 8)))
    if mesh:
        _out()
        _out("mesh " + " x ".join(f"{d.name}={d.size}" for d in mesh) + " (ranks):")
        _out(mesh_picture([(d.name, d.size) for d in mesh]))
    if args.at:
        _out()
        _out(f"load at {args.at}:")
        _out(table(["COMPONENT", "PATTERN", "WHAT THE LOAD DOES"],
                   [[c["key"], c["pattern"], c["action"]] for c in info["load_at"]["components"]]))
        _print_reads(info["load_at"]["components"])
    if args.tensors:
        _out()
        _out(table(["COMPONENT", "COPY", "TENSOR", "DTYPE", "SHAPE", "FILE"],
                   [[t["component"], t["copy"] or "-", t["name"], t["dtype"], t["shape"], t["file"]]
                    for t in info["tensor_list"]]))
    return EXIT_OK


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(open_checkpoint(args.checkpoint), _progress(args, "verify"))
    if report["deleted"]:
        raise CheckpointDeletedError(f"{report['path']} was deleted while it was being verified (by retention, "
                                     "`ckpt prune` or a person); nothing can be said about its files",
                                     path=report["path"])
    if args.json:
        _json(report)
    elif report["ok"]:
        _out(f"OK: all {report['checked']} files ({human_size(report['nbytes'])}) of {report['path']} match the "
             "manifest and pass a load's checks")
    else:
        _out(f"FAILED: {report['bad']} of {report['checked']} files of {report['path']} do not match the manifest "
             "or would be refused by a load")
        _out(table(["STATUS", "FILE", "COMPONENT", "WRITER", "DETAIL"],
                   [[f["status"], f["path"], f["component"], f["writer_rank"], f["detail"]]
                    for f in report["files"] if f["status"] != "ok"]))
    if report["unlisted"] and not args.json:
        _out(f"note: {len(report['unlisted'])} files not in the manifest: {', '.join(report['unlisted'][:5])}")
    return EXIT_OK if report["ok"] else EXIT_FOUND


def cmd_diff(args: argparse.Namespace) -> int:
    report = diff(open_checkpoint(args.a), open_checkpoint(args.b))
    if args.json:
        _json(report)
        return EXIT_OK if report["identical"] else EXIT_FOUND
    _out(f"a: {report['a']} (step {report['steps'][0]})\nb: {report['b']} (step {report['steps'][1]})")
    rows, same = [], 0
    for c in report["components"]:
        if c["status"] in ("added", "removed"):
            rows.append([c["key"], "-", "(whole component)", c["status"], ""])
            continue
        if c["pattern"][0] != c["pattern"][1]:
            rows.append([c["key"], "-", "(pattern)", "changed", " -> ".join(c["pattern"])])
        rows += [[c["key"], copy or "-", "(non-tensor state)", "changed", ""] for copy in c["non_tensor_state_changed"]]
        for t in c["tensors"]:
            if t["status"] == "same":
                same += 1
                continue
            detail = (f"max |a-b| = {t['max_abs_diff']:.6g}" if "max_abs_diff" in t else
                      f"{t['a']} -> {t['b']}" if "a" in t else f"{t['dtype']}{t['shape']}")
            rows.append([c["key"], t["copy"] or "-", t["name"], t["status"], detail])
    if rows:
        _out(table(["COMPONENT", "COPY", "TENSOR", "CHANGE", "DETAIL"], rows))
    _out(f"{len(rows)} differences, {same} tensors identical" if rows else f"identical ({same} tensors)")
    return EXIT_OK if report["identical"] else EXIT_FOUND


def _partial_status(name: str) -> str:
    if name.endswith(REPLACED_SUFFIX):
        return "set aside by an interrupted overwrite: the next coordinator of the run dir puts it back"
    return "unfinished save: never loaded, removed by the next save"


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "safetensors":
        result = run_format(open_checkpoint(args.checkpoint), args)
        if args.json:
            _json(result)
        else:
            _out("\n".join(result_lines(result)))
        return EXIT_OK
    if args.component is None:  # every component with tensors, into the folder -o names
        return _export_all(args)
    result = export_component(open_checkpoint(args.checkpoint), args.component, args.output, rank=args.rank,
                              group=args.group, node=args.node, concat_dim=args.concat_dim,
                              progress=_progress(args, "export"))
    if args.json:
        _json(result)
        return EXIT_OK
    _export_lines(result)
    return EXIT_OK


def _export_all(args: argparse.Namespace) -> int:
    chosen = [flag for flag, v in (("--rank", args.rank), ("--group", args.group), ("--node", args.node),
                                   ("--concat-dim", args.concat_dim)) if v is not None]
    if chosen:
        raise CheckpointError(f"{chosen[0]} picks a copy of one component; pass --component KEY with it")
    result = export_all(open_checkpoint(args.checkpoint), args.output, progress=_progress(args, "export"))
    if args.json:
        _json(result)
        return EXIT_OK
    for one in result["files"]:
        _export_lines(one)
    if result["left_out_components"]:
        _out(f"left out components without tensors: {', '.join(result['left_out_components'])}")
    return EXIT_OK


def _export_lines(result: dict[str, Any]) -> None:
    plural = "" if result["tensors"] == 1 else "s"
    _out(f"wrote {result['output']}: {result['tensors']} tensor{plural}, {human_size(result['nbytes'])} (component "
         f"{result['component']!r}, {result['pattern']}, {result['copy']}, step {result['step']})")
    left = result["left_out_non_tensor"]
    if left:
        _out(f"left out {len(left)} non-tensor values (safetensors holds tensors only): {', '.join(left[:8])}"
             + (", ..." if len(left) > 8 else ""))
    encoded = result.get("encoded_dtypes") or {}
    if encoded:
        shown = ", ".join(f"{name} {e['dtype']} -> {e['encoding']}" for name, e in list(encoded.items())[:8])
        _out(f"encoded {len(encoded)} tensors whose dtype safetensors lacks (see the file's ckpt.encoded_dtypes "
             f"metadata): {shown}" + (", ..." if len(encoded) > 8 else ""))


def _pin_command(pin: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        ck = open_checkpoint(args.checkpoint)
        changed = (pin_checkpoint if pin else unpin_checkpoint)(ck.storage, ck.path)
        if args.json:
            _json({"path": ck.path, "pinned": pin, "changed": changed})
        else:
            word = "pinned" if pin else "unpinned"
            _out(f"{word} {ck.path}" if changed else f"{ck.path} was already {word}")
        return EXIT_OK
    return run


# ---- entry point ---------------------------------------------------------------------------------

class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """Raises usage errors instead of exiting, so that `main` can report them as JSON under --json."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckpt", description="Inspect and manage ckpt checkpoints.")
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--debug", action="store_true", help="on an error, show the traceback")
        p.set_defaults(func=func)
        return p

    p = command("ls", cmd_ls, "list a run's checkpoints and why each is kept")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--check", action="store_true", help="exit 1 when a checkpoint's manifest is unreadable (damaged)")
    _add_policy_flags(p)
    p = command("inspect", cmd_inspect, "show a checkpoint's topology, components and files")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its dtype and shape")
    p.add_argument("--at", metavar="SHAPE", help="what a load under another layout would do, e.g. dp=1,tp=2 "
                                                  "(each saved mesh dimension), or world=N")
    p = command("verify", cmd_verify, "check every file as a load would: digests, tensor headers, value files "
                                       "(exit 1 if a load would refuse it, 3 if it was deleted meanwhile)")
    p.add_argument("checkpoint", metavar="CKPT")
    p = command("diff", cmd_diff, "what changed between two checkpoints (exit 1 if they differ)")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p = command("export", cmd_export, "write components as safetensors files (one, or every one with tensors), or "
                                      "the checkpoint in another format")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--component", help="the component's key, e.g. model (safetensors: without it, every component "
                                       "with tensors, into the folder -o names; --format hf: model by default; dcp, "
                                       "torch: every component by default)")
    p.add_argument("-o", "--output", required=True, help="the file (safetensors with --component, torch) or folder "
                                                          "(safetensors without --component, hf, dcp) to write")
    p.add_argument("--rank", type=int, help="the copy this rank loads (PER_RANK, PER_GROUP, PER_NODE)")
    p.add_argument("--group", type=int, help="PER_GROUP: the copy of this group index")
    p.add_argument("--node", type=int, help="PER_NODE: the copy of this node")
    p.add_argument("--concat-dim", type=int, metavar="D", help="concatenate every copy's tensors along dim D")
    add_format_flags(p)
    add_import_command(command)
    add_report_command(command)
    p = command("prune", cmd_prune, "apply a retention policy to a run now")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--force", action="store_true",
                   help="prune even while another process (a live job) holds the run dir's lock")
    _add_policy_flags(p)
    p = command("pin", _pin_command(True), "protect a checkpoint from every retention policy")
    p.add_argument("checkpoint", metavar="CKPT")
    p = command("unpin", _pin_command(False), "remove a checkpoint's pin")
    p.add_argument("checkpoint", metavar="CKPT")
    return parser


def _fail(command: str, text: str, as_json: bool, status: int = EXIT_ERROR) -> int:
    if as_json:
        _json({"error": text, "command": command, "exit_status": status})
    else:
        sys.stderr.write(f"ckpt {command}: error: {text}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `ckpt` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        if "--json" in argv:
            return _fail(exc.parser.prog.removeprefix("ckpt "), str(exc), True)
        exc.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{exc.parser.prog}: error: {exc}\n")
        return EXIT_ERROR
    try:
        return args.func(args)
    except BrokenPipeError:  # `ckpt ls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except Exception as exc:
        if os.environ.get("CKPT_DEBUG") or args.debug:
            raise
        known = isinstance(exc, CheckpointError | OSError | ValueError)
        text = " ".join(str(exc).split()) or type(exc).__name__
        status = EXIT_DELETED if isinstance(exc, CheckpointDeletedError) else EXIT_ERROR
        return _fail(args.command, text if known else f"unexpected {type(exc).__name__}: {text}", args.json, status)


if __name__ == "__main__":
    sys.exit(main())

