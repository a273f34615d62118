"""`ckpt report RUN_DIR -o report.html`: one self-contained HTML page that shows a run at a glance.

What it reads (all optional, all read as they are now, so a live run can be reported while it trains):
- `metrics.jsonl` (written by the trainers): `train` lines (loss), `eval` lines (eval_loss), `checkpoint` lines
  (a save was made at that step; one no longer on disk was deleted by retention);
- `recovery_events.jsonl` (trainers/recovery): NaN and gradient-spike skips, rollbacks, LR cuts and ramps;
- the committed checkpoints' manifests and the recorded retention policy: kept or going, best-N with rank,
  pinned, latest; checkpoints set aside as an abandoned timeline (`abandoned/*/checkpoint-*`, by a save after
  going back or a rollback) are shown as abandoned.
After a rollback the lines logged past the step returned to, before the rollback, are the abandoned timeline and
are drawn apart from the run's current one. The page has no script and loads nothing: the plot is inline SVG
(ckpt/cli/report_svg.py), details are in hover titles and in the retention table beside it.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..format.layout import ABANDONED_DIR, MANIFEST_NAME, parse_step
from ..format.manifest_read import read_manifest
from ..io.storage import LocalStorage, Storage, is_url, norm_path, storage_for
from ..retention.catalog import human_size, layer_policy, scan
from ..retention.rules import RetentionPolicy
from .report_svg import COLORS, plot_svg

# File names as trainers/keys.py and trainers/recovery/events.py define them (ckpt does not import trainers).
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "recovery_events.jsonl"
CHECKPOINT_KIND = "checkpoint"  # the metrics.jsonl line a trainer writes for each save


@dataclass(frozen=True)
class Point:
    step: int
    value: float
    abandoned: bool = False


@dataclass(frozen=True)
class Marker:
    """A checkpoint as the page shows it."""

    name: str
    step: int
    status: str  # kept | going | deleted | abandoned
    detail: str
    best_rank: int | None = None
    pinned: bool = False
    latest: bool = False
    value: float | None = None  # the metric it is placed at (eval loss, else train loss)


@dataclass
class RunPicture:
    """Everything the page draws."""

    run_dir: str
    train: list[Point] = field(default_factory=list)
    eval: list[Point] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    policy: str = ""
    metric: str = "eval_loss"


def read_jsonl(storage: Storage, path: str) -> list[dict[str, Any]]:
    """Every JSON object line of `path` ([] when it is missing); a line cut short by a live writer is skipped."""
    if not storage.exists(path):
        return []
    with storage.open_read(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("step"), int):
            out.append(obj)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out


def _abandoned_flags(lines: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[bool]:
    """Per metrics line: whether a later rollback went back past it (it belongs to an abandoned timeline)."""
    flags = [False] * len(lines)
    rollbacks = [e for e in events if e.get("kind") == "rollback" and isinstance(e.get("values"), dict)]
    for e in rollbacks:
        to_step, at = e["values"].get("to_step"), _number(e.get("time"))
        if not isinstance(to_step, int) or at is None:
            continue
        for i, line in enumerate(lines):
            t = _number(line.get("time"))
            if t is not None and t <= at and line["step"] > to_step:
                flags[i] = True
    return flags


def gather(run_dir: str, storage: Storage | None = None) -> RunPicture:
    """Read the run dir into what the page shows."""
    storage = storage or LocalStorage()
    pic = RunPicture(run_dir)
    lines = read_jsonl(storage, os.path.join(run_dir, METRICS_FILE))
    pic.events = read_jsonl(storage, os.path.join(run_dir, EVENTS_FILE))
    flags = _abandoned_flags(lines, pic.events)
    for line, gone in zip(lines, flags, strict=True):
        kind = line.get("kind")
        value = _number(line.get("loss" if kind == "train" else "eval_loss"))
        if kind in ("train", "eval") and value is not None and math.isfinite(value):
            (pic.train if kind == "train" else pic.eval).append(Point(line["step"], value, gone))
    applied = layer_policy(storage, run_dir, {}, {})
    pic.policy = applied.text()
    policy = applied.policy
    if policy is not None and policy.best_model_metric:
        pic.metric = policy.best_model_metric
    pic.markers = _markers(storage, run_dir, policy, lines, flags, pic.eval)
    return pic


def _markers(storage: Storage, run_dir: str, policy: RetentionPolicy | None, lines: list[dict[str, Any]],
             flags: list[bool], evals: list[Point]) -> list[Marker]:
    infos = scan(storage, run_dir)
    decision = (policy or RetentionPolicy()).decide(infos)
    by_path = {c.path: c for c in decision.checkpoints}
    best = {b.path: b.rank for b in decision.best}
    eval_at = {p.step: p.value for p in evals if not p.abandoned}
    out = []
    for i, info in enumerate(infos):
        d = by_path[info.path]
        status = "kept" if d.keep else "going"
        detail = ", ".join(d.reasons) if d.keep else f"would be deleted: {d.drop_reason}"
        out.append(Marker(os.path.basename(info.path), info.step, status, detail, best.get(info.path), info.pinned,
                          i == len(infos) - 1, _placed(info.metrics, eval_at, info.step)))
    on_disk = {m.step for m in out}
    abandoned = _abandoned(storage, run_dir)
    out += abandoned
    set_aside = {m.step for m in abandoned}
    for line, gone in zip(lines, flags, strict=True):
        step = line["step"]
        if line.get("kind") != CHECKPOINT_KIND or step in (set_aside if gone else on_disk):
            continue
        (set_aside if gone else on_disk).add(step)
        name = str(line.get("checkpoint") or f"step {step}")
        if gone:  # set aside by a rollback, then removed by retention (it was not pinned)
            out.append(Marker(name, step, "abandoned", "abandoned by a rollback, then deleted by retention"))
            continue
        out.append(Marker(name, step, "deleted", "deleted by retention", value=eval_at.get(step)))
    return sorted(out, key=lambda m: (m.step, m.status))


def _placed(metrics: dict[str, Any], eval_at: dict[int, float], step: int) -> float | None:
    for name in ("eval_loss", "train_loss"):
        value = _number(metrics.get(name))
        if value is not None and math.isfinite(value):
            return value
    return eval_at.get(step)


def _abandoned(storage: Storage, run_dir: str) -> list[Marker]:
    """Checkpoints set aside as an abandoned timeline under abandoned/<label>/ (ckpt/retention/timeline.py)."""
    root = os.path.join(run_dir, ABANDONED_DIR)
    out = []
    for label in storage.list_dir(root):
        for name in storage.list_dir(os.path.join(root, label)):
            step = parse_step(name)
            path = os.path.join(root, label, name)
            if step is None or not storage.exists(os.path.join(path, MANIFEST_NAME)):
                continue
            try:
                metrics = read_manifest(storage, path).metrics
            except Exception:  # a damaged manifest still marks where the abandoned checkpoint was
                metrics = {}
            out.append(Marker(name, step, "abandoned", f"set aside by {label} (after the run went back)",
                              value=_placed(metrics, {}, step)))
    return out


# ---- the page ---------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:18px;margin:0 0 4px} .sub{color:#555;margin:0 0 12px}
.wrap{display:flex;gap:16px;align-items:flex-start;overflow-x:auto}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.kept{color:#1a7f37} .going{color:#b35900} .deleted{color:#888} .abandoned{color:#c62828}
.events li{margin:2px 0} code{font-size:12px} td.why{max-width:230px;font-size:12px;color:#444} td.name{white-space:nowrap}
"""


def render(pic: RunPicture) -> str:
    """The page as one HTML string."""
    esc = html.escape
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    counts = {s: sum(1 for m in pic.markers if m.status == s) for s in ("kept", "going", "deleted", "abandoned")}
    summary = (f"{len(pic.train)} train and {len(pic.eval)} eval points, {len(pic.events)} recovery events; "
               f"checkpoints: {counts['kept'] + counts['going']} on disk ({counts['kept']} kept), "
               f"{counts['deleted']} deleted, {counts['abandoned']} abandoned")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ckpt report: {esc(pic.run_dir)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run {esc(pic.run_dir)}</h1>",
        f'<p class="sub">{esc(summary)}. Retention: {esc(pic.policy)}. Generated {now}.</p>',
        '<div class="wrap"><div>', plot_svg(pic), "</div>", _table(pic), "</div>", _events(pic),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(pic: RunPicture) -> str:
    esc = html.escape
    rows = []
    for m in pic.markers:
        tags = [f"best #{m.best_rank}"] * (m.best_rank is not None) + ["pinned"] * m.pinned + ["latest"] * m.latest
        value = "-" if m.value is None else f"{m.value:.4g}"
        rows.append(f'<tr><td class="name">{esc(m.name)}</td><td class="num">{m.step}</td><td class="num">{value}</td>'
                    f'<td class="{m.status}">{esc(m.status)}{" (" + esc(", ".join(tags)) + ")" if tags else ""}</td>'
                    f'<td class="why">{esc(m.detail)}</td></tr>')
    body = "\n".join(rows) or '<tr><td colspan="5">no checkpoints yet</td></tr>'
    return (f'<div><table><caption style="text-align:left;font-weight:600;padding:4px 0">Checkpoints</caption>'
            f"<tr><th>checkpoint</th><th>step</th><th>{esc(pic.metric)}</th><th>status</th><th>why</th></tr>"
            f"\n{body}\n</table></div>")


def _events(pic: RunPicture) -> str:
    if not pic.events:
        return ""
    esc = html.escape
    items = []
    for e in pic.events:
        values = e.get("values") if isinstance(e.get("values"), dict) else {}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items() if k != "set_aside")
        items.append(f"<li>step {e['step']}: <b>{esc(str(e.get('kind')))}</b> &rarr; {esc(str(e.get('action')))} "
                     f"({esc(str(e.get('reason', '')))}){' <code>' + esc(shown) + '</code>' if shown else ''}</li>")
    return f'<h2 style="font-size:15px">Recovery events</h2><ul class="events">{"".join(items)}</ul>'


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and os.sep in value:
        return os.path.basename(value)
    return str(value)


def write_report(run_dir: str, output: str | None = None, storage: Storage | None = None) -> dict[str, Any]:
    """Write the page for `run_dir` to `output`, replaced atomically. The default is RUN_DIR/report.html for a
    local run dir and `<prefix name>-report.html` in the current folder for an `s3://` one (a page to open
    in a browser is a local file)."""
    storage = storage_for(run_dir, storage)
    run_dir = norm_path(run_dir) if is_url(run_dir) else os.path.normpath(run_dir)
    if not storage.is_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run directory (it does not exist)")
    pic = gather(run_dir, storage)
    default = f"{os.path.basename(run_dir)}-report.html" if is_url(run_dir) else os.path.join(run_dir, "report.html")
    output = output or default
    tmp = f"{output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(pic))
    os.replace(tmp, output)
    return {"output": output, "run_dir": run_dir, "train_points": len(pic.train), "eval_points": len(pic.eval),
            "events": len(pic.events), "checkpoints": [m.__dict__ for m in pic.markers],
            "size": human_size(os.path.getsize(output))}


def add_report_command(command: Any) -> None:
    """Register `ckpt report` with main's `command(name, func, help)` helper."""
    p = command("report", cmd_report, "write one HTML page with the run's loss, checkpoints and recovery events")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="the .html file to write (default: RUN_DIR/report.html; for an s3:// "
                   "run dir, PREFIX-report.html in the current folder)")


def cmd_report(args: Any) -> int:
    r = write_report(args.run_dir, args.output)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"wrote {r['output']} ({r['size']}): {r['train_points']} train and {r['eval_points']} eval points, "
              f"{len(r['checkpoints'])} checkpoints, {r['events']} recovery events")
    return 0


__all__ = ["COLORS", "RunPicture", "add_report_command", "gather", "render", "write_report"]
