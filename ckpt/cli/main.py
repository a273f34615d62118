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
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import CheckpointDeletedError, CheckpointError
from ..load.reshape import load_plan, mesh_picture, parse_shape, saved_mesh
from ..retention.catalog import human_size
from .diffing import diff
from .export import export_all, export_component
from .export_formats import add_format_flags, result_lines, run_format
from .importing import add_import_command
from .inspection import deletion_noticed, describe, open_checkpoint, verify
from .output import (
    EXIT_DELETED,
    EXIT_ERROR,
    EXIT_FOUND,
    EXIT_OK,
    emit,
    metrics_text,
    pairs,
    print_json,
    progress_for,
    table,
    time_text,
)
from .report import add_report_command
from .retention_commands import add_policy_flags, cmd_ls, cmd_prune, pin_command


def _print_reads(components: list[dict]) -> None:
    """Per SHARDED component and rank: the byte ranges it will read, and how they compare to its shards."""
    for c in components:
        if "reads" not in c:
            continue
        emit()
        emit(f"{c['key']}: bytes each rank reads (every range: --json)")
        rows = []
        for r in c["reads"]:
            spans = "; ".join(f"{os.path.basename(f)} {', '.join(f'{b}..{e}' for b, e in v[:3])}"
                              + (f" (+{len(v) - 3} more ranges)" if len(v) > 3 else "") for f, v in r["ranges"].items())
            rows.append([r["rank"], human_size(r["read_bytes"]), human_size(r["target_bytes"]), spans or "-"])
        emit(table(["RANK", "READS", "ITS SHARDS", "BYTE RANGES"], rows, right=(0, 1, 2)))


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
        print_json(info)
        return EXIT_OK
    topo = info["topology"]
    groups = "; ".join(f"{k}={v}" for k, v in topo["process_groups"].items()) or "none"
    emit(pairs([
        ["checkpoint", info["path"] + ("  (pinned)" if info["pinned"] else "")],
        ["step", info["step"]], ["created", time_text(info["created_utc"]) + " UTC"],
        ["size", f"{human_size(info['nbytes'])} in {info['files']} files"], ["metrics", metrics_text(info["metrics"])],
        ["topology", f"{topo['world_size']} ranks on {topo['num_nodes']} node(s) of {topo['local_world_size']}, "
                     f"process groups: {groups}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())],
    ]))
    emit()
    emit(table(["COMPONENT", "PATTERN", "GROUP", "VALIDATION", "COPIES", "WRITER RANKS", "FILES", "SIZE", "TENSORS"],
               [[c["key"], c["pattern"], c["process_group"] or "-", c["validation_level"], c["copies"],
                 _ranks(c["writer_ranks"]), c["files"], human_size(c["nbytes"]), c["tensors"]] for c in info["components"]],
               right=(4, 6, 7, 8)))
    if mesh:
        emit()
        emit("mesh " + " x ".join(f"{d.name}={d.size}" for d in mesh) + " (ranks):")
        emit(mesh_picture([(d.name, d.size) for d in mesh]))
    if args.at:
        emit()
        emit(f"load at {args.at}:")
        emit(table(["COMPONENT", "PATTERN", "WHAT THE LOAD DOES"],
                   [[c["key"], c["pattern"], c["action"]] for c in info["load_at"]["components"]]))
        _print_reads(info["load_at"]["components"])
    if args.tensors:
        emit()
        emit(table(["COMPONENT", "COPY", "TENSOR", "DTYPE", "SHAPE", "FILE"],
                   [[t["component"], t["copy"] or "-", t["name"], t["dtype"], t["shape"], t["file"]]
                    for t in info["tensor_list"]]))
    return EXIT_OK


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(open_checkpoint(args.checkpoint), progress_for(args, "verify"))
    if report["deleted"]:
        raise CheckpointDeletedError(f"{report['path']} was deleted while it was being verified (by retention, "
                                     "`ckpt prune` or a person); nothing can be said about its files",
                                     path=report["path"])
    if args.json:
        print_json(report)
    elif report["ok"]:
        emit(f"OK: all {report['checked']} files ({human_size(report['nbytes'])}) of {report['path']} match the "
             "manifest and pass a load's checks")
    else:
        emit(f"FAILED: {report['bad']} of {report['checked']} files of {report['path']} do not match the manifest "
             "or would be refused by a load")
        emit(table(["STATUS", "FILE", "COMPONENT", "WRITER", "DETAIL"],
                   [[f["status"], f["path"], f["component"], f["writer_rank"], f["detail"]]
                    for f in report["files"] if f["status"] != "ok"]))
    if report["unlisted"] and not args.json:
        emit(f"note: {len(report['unlisted'])} files not in the manifest: {', '.join(report['unlisted'][:5])}")
    return EXIT_OK if report["ok"] else EXIT_FOUND


def cmd_diff(args: argparse.Namespace) -> int:
    report = diff(open_checkpoint(args.a), open_checkpoint(args.b))
    if args.json:
        print_json(report)
        return EXIT_OK if report["identical"] else EXIT_FOUND
    emit(f"a: {report['a']} (step {report['steps'][0]})\nb: {report['b']} (step {report['steps'][1]})")
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
        emit(table(["COMPONENT", "COPY", "TENSOR", "CHANGE", "DETAIL"], rows))
    emit(f"{len(rows)} differences, {same} tensors identical" if rows else f"identical ({same} tensors)")
    return EXIT_OK if report["identical"] else EXIT_FOUND


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "safetensors":
        result = run_format(open_checkpoint(args.checkpoint), args)
        if args.json:
            print_json(result)
        else:
            emit("\n".join(result_lines(result)))
        return EXIT_OK
    if args.component is None:  # every component with tensors, into the folder -o names
        return _export_all(args)
    result = export_component(open_checkpoint(args.checkpoint), args.component, args.output, rank=args.rank,
                              group=args.group, node=args.node, concat_dim=args.concat_dim,
                              progress=progress_for(args, "export"))
    if args.json:
        print_json(result)
        return EXIT_OK
    _export_lines(result)
    return EXIT_OK


def _export_all(args: argparse.Namespace) -> int:
    chosen = [flag for flag, v in (("--rank", args.rank), ("--group", args.group), ("--node", args.node),
                                   ("--concat-dim", args.concat_dim)) if v is not None]
    if chosen:
        raise CheckpointError(f"{chosen[0]} picks a copy of one component; pass --component KEY with it")
    result = export_all(open_checkpoint(args.checkpoint), args.output, progress=progress_for(args, "export"))
    if args.json:
        print_json(result)
        return EXIT_OK
    for one in result["files"]:
        _export_lines(one)
    if result["left_out_components"]:
        emit(f"left out components without tensors: {', '.join(result['left_out_components'])}")
    return EXIT_OK


def _export_lines(result: dict[str, Any]) -> None:
    plural = "" if result["tensors"] == 1 else "s"
    emit(f"wrote {result['output']}: {result['tensors']} tensor{plural}, {human_size(result['nbytes'])} (component "
         f"{result['component']!r}, {result['pattern']}, {result['copy']}, step {result['step']})")
    left = result["left_out_non_tensor"]
    if left:
        emit(f"left out {len(left)} non-tensor values (safetensors holds tensors only): {', '.join(left[:8])}"
             + (", ..." if len(left) > 8 else ""))
    encoded = result.get("encoded_dtypes") or {}
    if encoded:
        shown = ", ".join(f"{name} {e['dtype']} -> {e['encoding']}" for name, e in list(encoded.items())[:8])
        emit(f"encoded {len(encoded)} tensors whose dtype safetensors lacks (see the file's ckpt.encoded_dtypes "
             f"metadata): {shown}" + (", ..." if len(encoded) > 8 else ""))


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
    add_policy_flags(p)
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
    add_policy_flags(p)
    p = command("pin", pin_command(True), "protect a checkpoint from every retention policy")
    p.add_argument("checkpoint", metavar="CKPT")
    p = command("unpin", pin_command(False), "remove a checkpoint's pin")
    p.add_argument("checkpoint", metavar="CKPT")
    return parser


def _fail(command: str, text: str, as_json: bool, status: int = EXIT_ERROR) -> int:
    if as_json:
        print_json({"error": text, "command": command, "exit_status": status})
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

