"""Hung steps and dead launchers: a rank whose step runs past step_timeout_s exits naming the step (with or
without recovery), and killing the `torchrun` launcher alone ends every worker, so the run dir's lock is free."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ckpt.errors import CheckpointError, CollectiveTimeoutError, RunDirInUseError
from ckpt.io.lock import RunDirLock
from tests.support.demo import ENV, TINY
from tests.support.files import REPO
from trainers.demo.cli import speaks_for_the_job
from trainers.liveness import LAUNCHER_GONE_EXIT_CODE, StepWatchdog
from trainers.recovery import HEALTH_EXIT_CODE


class _Exited(Exception):
    pass


def _watchdog(timeout_s: float, **kwargs) -> tuple[StepWatchdog, list, threading.Event]:
    exits: list[int] = []
    done = threading.Event()
    dog = StepWatchdog(0, timeout_s, **kwargs)

    def exit_(code: int) -> None:
        exits.append(code)
        done.set()

    dog.exit = exit_
    return dog, exits, done


def test_a_step_past_its_timeout_exits_naming_the_step(caplog):
    hangs: list[tuple[int, float]] = []
    dog, exits, done = _watchdog(0.5, watch_parent=False, on_hang=lambda step, s: hangs.append((step, s)))
    dog.start()
    try:
        with dog.step(3):
            pass  # a step that ends in time is never reported
        with dog.step(4):
            assert done.wait(30), "the watchdog never fired"
    finally:
        dog.stop()
    assert exits == [HEALTH_EXIT_CODE] and [h[0] for h in hangs] == [4] and hangs[0][1] > 0.5
    assert "step 4 has not finished after" in caplog.text


def test_the_watchdog_exits_when_its_parent_changes():
    dog, exits, done = _watchdog(0, watch_parent=True)
    dog._parent = -1  # what os.getppid() can never return: as if the launcher was gone and we were re-parented
    dog.start()
    try:
        assert done.wait(30), "the watchdog never noticed"
    finally:
        dog.stop()
    assert exits == [LAUNCHER_GONE_EXIT_CODE]


def test_a_zero_timeout_and_no_launcher_start_no_thread():
    dog, _, _ = _watchdog(0, watch_parent=False)
    dog.start()
    assert dog._thread is None and not dog.active


def _demo(run_dir, *extra: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "trainers.demo", "--run-dir", str(run_dir), *TINY, *extra]


def test_a_hang_without_recovery_is_noticed_at_its_step(tmp_path):
    proc = subprocess.run(_demo(tmp_path / "run", "--max-steps", "20", "--no-recovery", "--step-timeout", "5",
                                "--inject-hang", "11"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    noticed = re.findall(r"rank (\d): step (\d+) has not finished after (\d+)s \(step_timeout_s=5\)", out)
    # Each rank times its own step; the first to exit can end the other's wait with a lost connection first.
    assert noticed and {s for _, s, _ in noticed} == {"11"}, out[-3000:]
    assert "exitcode  : 75" in out


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _acquire_within(run_dir: str, seconds: float) -> RunDirLock:
    """The lock, once the kernel has let go of the dead holder's file (a worker's exit can trail its reaping
    on a loaded machine); the last refusal if it is still held after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return RunDirLock.acquire(run_dir)
        except RunDirInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_killing_the_launcher_ends_hung_workers_and_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    # The workers hang at step 6 with nothing to end it (no recovery, no step watchdog): only the launcher's
    # death can. torchrun gets its own session, as a job's launcher would have.
    launcher = subprocess.Popen(_demo(run_dir, "--max-steps", "50", "--no-recovery", "--step-timeout", "0",
                                      "--inject-hang", "6"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        seen = []
        for line in launcher.stdout:  # until a worker is stuck in the injected hang
            seen.append(line)
            if "fault injection: hanging" in line:
                break
        else:
            pytest.fail("the demo ended before the hang:\n" + "".join(seen[-40:]))
        workers = _children(launcher.pid)
        assert len(workers) == 2, (workers, "".join(seen[-20:]))
        with pytest.raises(Exception, match="in use by another job"):
            RunDirLock.acquire(str(run_dir))  # the hung job holds it
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived their launcher"
        _acquire_within(str(run_dir), 30).release()  # free: the next job can start
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in workers:  # only if the test failed: never leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_demo_prints_a_ckpt_error_as_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = RunDirLock.acquire(str(run_dir))  # another job owns the run dir
    try:
        cmd = [sys.executable, "-m", "trainers.demo", "--run-dir", str(run_dir), "--max-steps", "2", *TINY]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        debug = subprocess.run([*cmd, "--debug"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        held.release()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "checkpoint error" in line]
    assert len(errors) == 1 and "RunDirInUseError" in errors[0] and f"pid {os.getpid()}" in errors[0], proc.stderr
    assert "Traceback" in debug.stderr and "RunDirInUseError" in debug.stderr


def test_the_demo_error_is_printed_once_even_when_rank_zero_is_the_one_that_died():
    dead_zero = CheckpointError("rank 1: lost contact ...: rank 0 died", failures={0: "died during the 'commit' step"})
    assert [r for r in range(4) if speaks_for_the_job(dead_zero, r, 4)] == [1]
    hung = CollectiveTimeoutError("rank 2: timed out ...", phase="write", missing_ranks=[0, 1])
    assert [r for r in range(4) if speaks_for_the_job(hung, r, 4)] == [2]
    plain = CheckpointError("save of step 3 failed on rank 2 during 'write'", failures={2: "ENOSPC"})
    assert [r for r in range(4) if speaks_for_the_job(plain, r, 4)] == [0]
    everyone = CheckpointError("x", failures={0: "a", 1: "b"})
    assert [r for r in range(2) if speaks_for_the_job(everyone, r, 2)] == [0]
