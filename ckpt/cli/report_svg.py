"""The report's plot as inline SVG: loss against step, recovery events above it, checkpoints in a lane below.

Pure drawing: it takes the RunPicture that ckpt/cli/report.py gathered and returns SVG text (every detail of a
mark is in its <title>, shown on hover; no script).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

COLORS = {"train": "#1f77b4", "eval": "#ff7f0e", "abandoned": "#9e9e9e", "rollback": "#d62728", "skip": "#d62728",
          "clip": "#e6a100", "lr": "#9467bd", "kept": "#2ca02c", "going": "#e67e22", "best": "#f2b600",
          "deleted": "#7f7f7f", "event": "#333333", "grid": "#e6e6e6"}
W, H = 860, 430
LEFT, RIGHT, TOP, BOTTOM = 62, 24, 84, 318  # the plot area
EVENT_Y, LANE_Y = 72, 372


class _Scale:
    def __init__(self, steps: Sequence[int], values: Sequence[float]):
        self.x0, self.x1 = (min(0, *steps), max(steps)) if steps else (0, 1)
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        self.log = bool(finite) and lo > 0 and hi / lo > 4
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        pad = (hi - lo) * 0.06 or 0.5
        self.y0, self.y1 = lo - pad, hi + pad

    def x(self, step: float) -> float:
        return LEFT + (step - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def y(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (BOTTOM - TOP)


def _nice(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _title(text: str) -> str:
    return f"<title>{html.escape(text)}</title>"


def plot_svg(pic: Any) -> str:
    """The whole plot for a RunPicture."""
    steps = [p.step for p in pic.train + pic.eval] + [m.step for m in pic.markers] + [e["step"] for e in pic.events]
    values = [p.value for p in pic.train + pic.eval]
    s = _Scale(steps, values)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="system-ui,sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{COLORS["rollback"]}"/></marker></defs>',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>']
    out += _axes(s)
    out += _lr_bands(s, pic.events)
    out += _lines(s, pic.train, pic.eval)
    out += _event_marks(s, pic.events)
    out += _checkpoint_lane(s, pic.markers)
    out += _legend()
    out.append("</svg>")
    return "\n".join(out)


def _axes(s: _Scale) -> list[str]:
    out = []
    for step in _nice(s.x0, s.x1):
        x = s.x(step)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{BOTTOM}" stroke="{COLORS["grid"]}"/>')
        out.append(f'<text x="{x:.1f}" y="{BOTTOM + 14}" text-anchor="middle">{int(step)}</text>')
    if s.log:
        ticks = [m * 10**k for k in range(math.floor(s.y0), math.ceil(s.y1) + 1) for m in (1, 2, 3, 5)
                 if s.y0 <= math.log10(m * 10**k) <= s.y1]
    else:
        ticks = _nice(s.y0, s.y1, 5)
    for v in ticks:
        y = s.y(v)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="{COLORS["grid"]}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{BOTTOM - TOP}" fill="none" '
               'stroke="#999"/>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{BOTTOM + 30}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{(TOP + BOTTOM) / 2}" transform="rotate(-90 14 {(TOP + BOTTOM) / 2})" '
               f'text-anchor="middle">loss{" (log scale)" if s.log else ""}</text>')
    return out


def _runs(points: Sequence[Any]) -> list[list[Any]]:
    """Consecutive points (in file order) of the same timeline, each run to be drawn as one line."""
    runs: list[list[Any]] = []
    for p in points:
        if runs and runs[-1][-1].abandoned == p.abandoned and p.step > runs[-1][-1].step:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _polyline(s: _Scale, run: list[Any], color: str, width: float, dash: str = "") -> str:
    pts = " ".join(f"{s.x(p.step):.1f},{s.y(p.value):.1f}" for p in run)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}"{extra}/>'


def _lines(s: _Scale, train: list[Any], evals: list[Any]) -> list[str]:
    out = []
    for run in _runs(train):
        gone = run[0].abandoned
        out.append(_polyline(s, run, COLORS["abandoned"] if gone else COLORS["train"], 1.5 if gone else 2.5,
                             "5 3" if gone else ""))
    for run in _runs(evals):
        gone = run[0].abandoned
        color = COLORS["abandoned"] if gone else COLORS["eval"]
        out.append(_polyline(s, run, color, 1.5 if gone else 2, "5 3" if gone else ""))
        for p in run:
            out.append(f'<circle cx="{s.x(p.step):.1f}" cy="{s.y(p.value):.1f}" r="3.5" fill="{color}">'
                       f'{_title(f"eval_loss {p.value:.4g} at step {p.step}" + (" (abandoned timeline)" if gone else ""))}'
                       "</circle>")
    return out


def _lr_bands(s: _Scale, events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        if e.get("kind") != "lr_change":
            continue
        v = e.get("values") or {}
        ramp = v.get("ramp_steps") if isinstance(v.get("ramp_steps"), int) else 0
        x0 = s.x(e["step"])
        x1 = min(s.x(e["step"] + ramp), W - RIGHT) if ramp else x0 + 2
        label = f"LR x{v.get('lr_scale', '?')}" + (f", ramp {ramp} steps" if ramp else "")
        out.append(f'<rect x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 2):.1f}" height="{BOTTOM - TOP}" '
                   f'fill="{COLORS["lr"]}" fill-opacity="0.12">{_title(label + ": " + str(e.get("reason", "")))}</rect>')
        out.append(f'<text x="{x0 + 4:.1f}" y="{TOP + 13}" fill="{COLORS["lr"]}">{html.escape(label)}</text>')
    return out


def _event_marks(s: _Scale, events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        kind, action, step = e.get("kind"), e.get("action"), e["step"]
        v = e.get("values") or {}
        text = f"step {step}: {kind} -> {action} ({e.get('reason', '')})"
        if kind == "rollback" and isinstance(v.get("from_step"), int) and isinstance(v.get("to_step"), int):
            xa, xb = s.x(v["from_step"]), s.x(v["to_step"])
            mid = (xa + xb) / 2
            out.append(f'<path d="M{xa:.1f},{EVENT_Y} Q{mid:.1f},{EVENT_Y - 50} {xb:.1f},{EVENT_Y}" fill="none" '
                       f'stroke="{COLORS["rollback"]}" stroke-width="2.5" marker-end="url(#arrow)">'
                       f"{_title(text)}</path>")
            out.append(f'<text x="{mid:.1f}" y="{EVENT_Y - 27}" text-anchor="middle" fill="{COLORS["rollback"]}">'
                       f'rollback {v["from_step"]} &#8594; {v["to_step"]}</text>')
            out.append(f'<line x1="{xa:.1f}" y1="{EVENT_Y}" x2="{xa:.1f}" y2="{BOTTOM}" stroke="{COLORS["rollback"]}" '
                       'stroke-dasharray="2 3"/>')
            continue
        if kind == "lr_change":
            continue
        x = s.x(step)
        if kind in ("non_finite", "grad_norm_spike"):
            color = COLORS["clip"] if action == "clip" else COLORS["skip"]
            out.append(f'<path d="M{x - 5:.1f},{EVENT_Y - 8} L{x + 5:.1f},{EVENT_Y - 8} L{x:.1f},{EVENT_Y} z" '
                       f'fill="{color}">{_title(text)}</path>')
        else:
            out.append(f'<path d="M{x:.1f},{EVENT_Y - 10} L{x + 5:.1f},{EVENT_Y - 5} L{x:.1f},{EVENT_Y} '
                       f'L{x - 5:.1f},{EVENT_Y - 5} z" fill="{COLORS["event"]}">{_title(text)}</path>')
    return out


def _star(x: float, y: float, r: float) -> str:
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append(f"{x + rr * math.cos(a):.1f},{y + rr * math.sin(a):.1f}")
    return " ".join(pts)


def _checkpoint_lane(s: _Scale, markers: list[Any]) -> list[str]:
    out = [f'<text x="{LEFT}" y="{LANE_Y - 10}" fill="#555">checkpoints</text>',
           f'<line x1="{LEFT}" y1="{LANE_Y}" x2="{W - RIGHT}" y2="{LANE_Y}" stroke="#ccc"/>']
    for m in markers:
        x = s.x(m.step)
        tags = [f"best #{m.best_rank}"] * (m.best_rank is not None) + ["pinned"] * m.pinned + ["latest"] * m.latest
        tip = _title(f"{m.name} (step {m.step}): {m.status}{' (' + ', '.join(tags) + ')' if tags else ''}: {m.detail}")
        if m.status in ("kept", "going"):
            out.append(f'<line x1="{x:.1f}" y1="{BOTTOM}" x2="{x:.1f}" y2="{LANE_Y}" stroke="{COLORS[m.status]}" '
                       'stroke-dasharray="1 3"/>')
        if m.status == "kept":
            out.append(f'<circle cx="{x:.1f}" cy="{LANE_Y}" r="6" fill="{COLORS["kept"]}">{tip}</circle>')
        elif m.status == "going":
            out.append(f'<circle cx="{x:.1f}" cy="{LANE_Y}" r="6" fill="#fff" stroke="{COLORS["going"]}" '
                       f'stroke-width="2">{tip}</circle>')
        elif m.status == "deleted":
            out.append(f'<path d="M{x - 5:.1f},{LANE_Y - 5} L{x + 5:.1f},{LANE_Y + 5} M{x - 5:.1f},{LANE_Y + 5} '
                       f'L{x + 5:.1f},{LANE_Y - 5}" stroke="{COLORS["deleted"]}" stroke-width="2">{tip}</path>')
        else:
            out.append(f'<rect x="{x - 5:.1f}" y="{LANE_Y - 5}" width="10" height="10" fill="#fff" '
                       f'stroke="{COLORS["rollback"]}" stroke-width="2">{tip}</rect>')
        if m.best_rank is not None:
            out.append(f'<polygon points="{_star(x, LANE_Y - 16, 7)}" fill="{COLORS["best"]}" stroke="#8a6d00">'
                       f'{tip}</polygon><text x="{x + 8:.1f}" y="{LANE_Y - 18}">#{m.best_rank}</text>')
        below = ["latest"] * m.latest + ["pinned"] * m.pinned
        if below:
            out.append(f'<text x="{x:.1f}" y="{LANE_Y + 20}" text-anchor="middle">{" ".join(below)}</text>')
    return out


def _legend() -> list[str]:
    items = [("line", COLORS["train"], "train loss"), ("dash", COLORS["abandoned"], "abandoned timeline"),
             ("dot", COLORS["eval"], "eval loss"), ("arrow", COLORS["rollback"], "rollback"),
             ("tri", COLORS["skip"], "skipped step"), ("tri", COLORS["clip"], "clipped step"),
             ("band", COLORS["lr"], "LR cut / ramp"), ("dot", COLORS["kept"], "kept"),
             ("ring", COLORS["going"], "next to go"), ("star", COLORS["best"], "best-N"),
             ("x", COLORS["deleted"], "deleted"), ("square", COLORS["rollback"], "abandoned ckpt")]
    out, x, y = [], 8.0, 14
    for kind, color, label in items:
        if kind in ("line", "dash", "arrow"):
            dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
            out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2.5"{dash}/>')
        elif kind == "band":
            out.append(f'<rect x="{x}" y="{y - 10}" width="18" height="12" fill="{color}" fill-opacity="0.25"/>')
        elif kind == "tri":
            out.append(f'<path d="M{x + 4},{y - 9} L{x + 14},{y - 9} L{x + 9},{y} z" fill="{color}"/>')
        elif kind == "star":
            out.append(f'<polygon points="{_star(x + 9, y - 4, 6)}" fill="{color}"/>')
        elif kind == "x":
            out.append(f'<path d="M{x + 4},{y - 9} L{x + 14},{y + 1} M{x + 4},{y + 1} L{x + 14},{y - 9}" '
                       f'stroke="{color}" stroke-width="2"/>')
        elif kind == "square":
            out.append(f'<rect x="{x + 4}" y="{y - 9}" width="10" height="10" fill="#fff" stroke="{color}" '
                       'stroke-width="2"/>')
        elif kind == "ring":
            out.append(f'<circle cx="{x + 9}" cy="{y - 4}" r="5" fill="#fff" stroke="{color}" stroke-width="2"/>')
        else:
            out.append(f'<circle cx="{x + 9}" cy="{y - 4}" r="4.5" fill="{color}"/>')
        out.append(f'<text x="{x + 22}" y="{y}">{label}</text>')
        x += 28 + 6.2 * len(label)
        if x > W - 120:
            x, y = 8.0, y + 18
    return out
