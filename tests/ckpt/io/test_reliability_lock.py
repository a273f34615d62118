"""Two jobs on one run dir: the second coordinator is refused with a clear error (the run dir's lock),
a dead holder never blocks, and with force=True every commit is still atomic."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    RetentionPolicy,
    RunDirInUseError,
    SharingPattern,
    StateComponent,
    list_checkpoints,
)
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.format.layout import LOCK_NAME
from ckpt.io.lock import RunDirLock
from ckpt.io.storage import LocalStorage
from tests.support.distributed import failures, run_ranks
from tests.support.files import REPO
from tests.support.workers import Box


def _lockable(run_dir) -> bool:
    """Whether another open file description could take the lock now (flock conflicts even in-process)."""
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


CONTENDER = """
    import sys
    from ckpt import CheckpointCoordinator, CheckpointError
    try:
        CheckpointCoordinator(sys.argv[1], force=sys.argv[2] == "force").close()
        print("OK")
    except CheckpointError as exc:
        print(type(exc).__name__, exc)
"""


def test_a_second_job_is_refused_naming_the_holder_until_the_first_closes(tmp_path):
    with CheckpointCoordinator(tmp_path) as coord:
        assert not _lockable(tmp_path)
        again = CheckpointCoordinator(tmp_path)  # the same process may build another: it shares the lock
        again.close()
        assert not _lockable(tmp_path), "the first coordinator still holds it"
        out, _ = _python(CONTENDER, str(tmp_path), "no").communicate(timeout=120)
        assert out.startswith("RunDirInUseError"), out
        assert f"pid {os.getpid()}" in out and "force=True" in out and str(tmp_path) in out
        forced, _ = _python(CONTENDER, str(tmp_path), "force").communicate(timeout=120)
        assert forced.strip() == "OK"
        coord.save(1, [StateComponent("m", Box({"w": torch.ones(2)}), SharingPattern.GLOBAL)])
    assert _lockable(tmp_path), "close() released it"
    with pytest.raises(Exception, match="was closed"):
        coord.save(2, [])


def test_a_lock_left_by_a_killed_job_does_not_block(tmp_path):
    holder = _python("""
        import sys, time
        from ckpt import CheckpointCoordinator
        c = CheckpointCoordinator(sys.argv[1])
        print("holding", flush=True)
        time.sleep(600)
    """, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunDirInUseError, match=f"pid {holder.pid} on host "):
            CheckpointCoordinator(tmp_path)
        with pytest.raises(RunDirInUseError) as err:
            RunDirLock.acquire(str(tmp_path))
        assert err.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    CheckpointCoordinator(tmp_path).close()  # the kernel dropped the dead job's lock


def _start_on_locked_dir(rank: int, world: int, run_dir: str) -> None:
    CheckpointCoordinator(run_dir, timeout=30)


@pytest.mark.slow
def test_every_rank_of_a_second_job_gets_the_error(tmp_path):
    with CheckpointCoordinator(tmp_path):
        results = run_ranks(2, _start_on_locked_dir, str(tmp_path))
    bad = failures(results)
    assert sorted(bad) == [0, 1]
    for f in bad.values():
        assert f.type_name == "RunDirInUseError", f
        assert "failed on rank 0 during 'lock'" in f.message and f"pid {os.getpid()}" in f.message


FORCED_JOB = """
    import os, sys, time, torch
    from ckpt import CheckpointCoordinator, CheckpointError, SharingPattern, StateComponent
    from tests.support.workers import Box
    run_dir, first, force = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "force"
    coord = CheckpointCoordinator(run_dir, force=force)
    print("started", flush=True)
    go = os.path.join(run_dir, "go")
    if force:
        open(go, "w").close()
    while not os.path.exists(go):  # the first job holds the lock until the second is running
        time.sleep(0.05)
    for step in range(first, first + 30, 2):
        state = {f"w{i}": torch.full((250_000,), float(step)) for i in range(4)}
        try:
            coord.save(step, [StateComponent("m", Box(state), SharingPattern.GLOBAL)])
            print("saved", step, flush=True)
        except CheckpointError as exc:  # the other job may remove this one's unfinished folder
            print("failed", step, type(exc).__name__, exc, flush=True)
"""


@pytest.mark.slow
def test_forced_concurrent_jobs_still_commit_atomically(tmp_path):
    jobs = [_python(FORCED_JOB, str(tmp_path), "0", "no")]
    assert jobs[0].stdout.readline().strip() == "started"
    jobs.append(_python(FORCED_JOB, str(tmp_path), "1", "force"))
    outs = [job.communicate(timeout=300) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outs
    assert "going on without the lock" in outs[1][1], outs[1][1]
    saved = sorted(int(line.split()[1]) for out, _ in outs for line in out.splitlines() if line.startswith("saved"))
    refs = list_checkpoints(LocalStorage(), str(tmp_path))
    assert [r.step for r in refs] == saved, "every save reported done is committed, and no other"
    for ref in refs:  # and every committed checkpoint is complete, with its own step's values
        assert verify(open_checkpoint(ref.path))["ok"]
        target = Box({})
        with CheckpointCoordinator(tmp_path, force=True) as reader:
            reader.load([StateComponent("m", target, SharingPattern.GLOBAL)], checkpoint=ref.step)
        assert all(torch.equal(t, torch.full((250_000,), float(ref.step))) for t in target.state.values())


def test_a_read_only_coordinator_loads_from_a_live_run_without_the_lock(tmp_path):
    """An eval job reads a run whose trainer (another process) holds the lock: no force, no lock, no writes."""
    holder = _python("""
        import sys, time, torch
        from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
        from tests.support.workers import Box
        c = CheckpointCoordinator(sys.argv[1])
        c.save(3, [StateComponent("m", Box({"w": torch.full((4,), 3.0)}), SharingPattern.GLOBAL)])
        print("holding", flush=True)
        time.sleep(600)
    """, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read() if holder.poll() else ""
        unfinished = tmp_path / "checkpoint-00000004.partial"  # the trainer's save in flight: not ours to clean
        unfinished.mkdir()
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(RunDirInUseError):
            CheckpointCoordinator(tmp_path)
        with CheckpointCoordinator(tmp_path, read_only=True,
                                   retention=RetentionPolicy(save_total_limit=1)) as reader:
            target = Box({})
            result = reader.load([StateComponent("m", target, SharingPattern.GLOBAL)])
            assert result.step == 3 and torch.equal(target.state["w"], torch.full((4,), 3.0))
            with pytest.raises(CheckpointError, match=r"read-only \(read_only=True\).*Save from the job that owns"):
                reader.save(5, [StateComponent("m", Box({"w": torch.ones(4)}), SharingPattern.GLOBAL)])
        assert sorted(os.listdir(tmp_path)) == before, "the reader created, cleaned or deleted nothing"
        assert holder.poll() is None and not _lockable(tmp_path), "the trainer still holds its lock"
        with pytest.raises(TypeError, match="read_only='yes'"):
            CheckpointCoordinator(tmp_path, read_only="yes")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointNotFoundError), CheckpointCoordinator(missing, read_only=True) as reader:
        reader.load([])
    assert not missing.exists(), "a read-only coordinator creates no run dir"
