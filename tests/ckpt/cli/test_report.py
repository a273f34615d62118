"""`ckpt report`: the page of a demo run with an injected divergence, rendered by headless Chromium (a real
browser, no mocks), shows the loss, the rollback and the checkpoints; the page reads a live run dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent
from ckpt.cli import main
from ckpt.cli.report import CHECKPOINT_KIND, EVENTS_FILE, METRICS_FILE, gather
from ckpt.cli.report_svg import COLORS
from tests.support.demo import SHORT
from tests.support.files import REPO
from tests.support.png import count_colors
from tests.support.workers import Box

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def test_file_names_match_the_trainers():
    from trainers.keys import CHECKPOINT_KIND as kind
    from trainers.keys import METRICS_FILE as metrics
    from trainers.recovery.events import EVENTS_FILE as events

    assert (metrics, events, kind) == (METRICS_FILE, EVENTS_FILE, CHECKPOINT_KIND)


def _screenshot(page: str, png: str, profile: str) -> None:
    """Render `page` with headless Chromium, or skip saying why it cannot run here."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1500,900",
           f"--screenshot={png}", f"file://{page}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium cannot run here: {exc}")
    if not os.path.exists(png):
        pytest.skip(f"chromium cannot run here (exit {proc.returncode}): {proc.stderr[-800:]}")


def test_the_report_of_a_demo_run_with_a_divergence_shows_the_plot(tmp_path):
    run_dir = tmp_path / "div"
    proc = subprocess.run([sys.executable, "-m", "trainers.demo", "--run-dir", str(run_dir), *SHORT,
                           "--inject-divergence", "120"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    page = run_dir / "report.html"
    assert f"wrote {page}" in proc.stdout  # the demo ends by printing the report's path
    text = page.read_text()
    assert "<script" not in text and not re.search(r"\b(src|href)=", text)  # self-contained: nothing to fetch
    with open(run_dir / EVENTS_FILE) as f:
        rollback = next(e for e in map(json.loads, f) if e["kind"] == "rollback")["values"]
    assert f"rollback {rollback['from_step']} &#8594; {rollback['to_step']}" in text
    assert "LR x0.5, ramp 200 steps" in text
    pic = gather(str(run_dir))
    statuses = {m.status for m in pic.markers}
    assert {"kept", "deleted", "abandoned"} <= statuses
    assert sorted(m.best_rank for m in pic.markers if m.best_rank) == [1, 2]
    assert any(p.abandoned for p in pic.train) and any(not p.abandoned for p in pic.train)
    png = tmp_path / "report.png"
    _screenshot(str(page), str(png), str(tmp_path / "profile"))
    counts = count_colors(str(png), [COLORS["train"], COLORS["eval"], COLORS["rollback"], COLORS["kept"],
                                     COLORS["deleted"]])
    # The train loss is a line across the plot (600+ px wide, 2.5 px thick); the rest are marks.
    assert counts[COLORS["train"]] > 500, counts
    assert counts[COLORS["eval"]] > 150, counts
    assert counts[COLORS["rollback"]] > 150, counts  # the rollback arrow and the abandoned checkpoint
    assert counts[COLORS["kept"]] > 60 and counts[COLORS["deleted"]] > 20, counts


def test_the_report_reads_a_live_run_dir(tmp_path, capsys):
    """A half-written metrics line, an unfinished save and no policy file: the page is still drawn."""
    run_dir = tmp_path / "run"
    policy = RetentionPolicy(save_total_limit=1, preserve_n_best=1, best_model_metric="eval_loss")
    with CheckpointCoordinator(run_dir, retention=policy) as coord:
        for step, loss in ((10, 2.0), (20, 1.5), (30, 1.8)):
            coord.save(step, [StateComponent("w", Box({"w": torch.ones(2)}), SharingPattern.GLOBAL)],
                       {"eval_loss": loss})
    lines = [{"kind": "train", "time": 1.0 + s, "step": s, "loss": 3.0 - s / 20} for s in range(5, 35, 5)]
    lines += [{"kind": CHECKPOINT_KIND, "time": 1.0 + s, "step": s, "checkpoint": f"checkpoint-{s:08d}"}
              for s in (10, 20, 30)]
    lines += [{"kind": "eval", "time": 1.0 + s, "step": s, "eval_loss": v} for s, v in ((10, 2.0), (20, 1.5))]
    with open(run_dir / METRICS_FILE, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.write('{"kind": "train", "step": 35, "lo')  # the trainer is writing this line right now
    (run_dir / "checkpoint-00000040.partial").mkdir()
    assert main(["report", str(run_dir), "-o", str(tmp_path / "r.html"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_step = {c["step"]: c for c in out["checkpoints"]}
    assert out["train_points"] == 6 and out["eval_points"] == 2
    assert by_step[10]["status"] == "deleted" and by_step[20]["best_rank"] == 1 and by_step[30]["latest"]
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_the_report_marks_a_pinned_checkpoint_and_every_kind_of_event(tmp_path, capsys):
    """A pinned checkpoint outlives retention and says so; NaN skips, clipped spikes, LR cuts and a rollback each
    get their own mark, with the event's details in its hover title."""
    run_dir = tmp_path / "run"
    policy = RetentionPolicy(save_total_limit=1)
    with CheckpointCoordinator(run_dir, retention=policy) as coord:
        for step in (10, 20, 30, 40):
            coord.save(step, [StateComponent("w", Box({"w": torch.ones(2)}), SharingPattern.GLOBAL)],
                       {"train_loss": 3.0 - step / 20})
            if step == 10:
                assert main(["pin", str(run_dir / "checkpoint-00000010")]) == 0
    events = [{"time": 2.0, "step": 15, "kind": "non_finite", "action": "skip", "reason": "loss is nan",
               "values": {"loss": "nan"}},
              {"time": 3.0, "step": 25, "kind": "grad_norm_spike", "action": "clip", "reason": "grad norm 9.1 > 5x",
               "values": {"grad_norm": 9.1}},
              {"time": 4.0, "step": 35, "kind": "rollback", "action": "rollback", "reason": "loss diverged",
               "values": {"from_step": 35, "to_step": 30}},
              {"time": 4.5, "step": 30, "kind": "lr_change", "action": "reduce_lr", "reason": "after the rollback",
               "values": {"lr_scale": 0.25, "ramp_steps": 5}}]
    with open(run_dir / EVENTS_FILE, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    capsys.readouterr()
    assert main(["report", str(run_dir), "-o", str(tmp_path / "r.html"), "--json"]) == 0
    by_step = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert sorted(by_step) == [10, 40]  # 20 and 30 went to retention, the pinned 10 stayed
    assert by_step[10]["pinned"] and by_step[10]["status"] == "kept" and not by_step[10]["latest"]
    assert by_step[40]["latest"] and not by_step[40]["pinned"]
    text = (tmp_path / "r.html").read_text()
    assert '<td class="kept">kept (pinned)</td>' in text and '<td class="kept">kept (latest)</td>' in text
    assert ">pinned</text>" in text and ">latest</text>" in text  # under each mark in the checkpoint lane
    assert f'fill="{COLORS["skip"]}"><title>step 15: non_finite -&gt; skip (loss is nan)</title>' in text
    assert f'fill="{COLORS["clip"]}"><title>step 25: grad_norm_spike -&gt; clip' in text
    assert "rollback 35 &#8594; 30" in text and 'marker-end="url(#arrow)"' in text
    assert "LR x0.25, ramp 5 steps" in text
