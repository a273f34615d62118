"""Storage faults (ENOSPC, EIO, failed fsync) through ckpt.testing.FaultyStorage: the save fails on every
rank with an error naming the rank and the file, earlier checkpoints stay intact, and the job can go on."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ckpt import CheckpointCoordinator, CheckpointError, StateComponent
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.io.storage import LocalStorage
from ckpt.testing import Fault, FaultyStorage
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box, model_and_rng


def _components(rank: int, step: int) -> list[StateComponent]:
    """Four replicated tensors (so both ranks write a part) and a per-rank file, all derived from `step`."""
    return model_and_rng({f"w{i}": torch.full((64,), float(step * 10 + i)) for i in range(4)},
                         {"seed": torch.tensor([rank, step]), "step": step})


# ---- the fault layer itself ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"op": "write"}, "op='write'"),
    ({"op": "write_file", "error": "boom"}, "error='boom'"),
    ({"op": "write_file", "error": "sleep:x"}, "error='sleep:x'"),
    ({"op": "write_file", "rank": -1}, "rank=-1"),
    ({"op": "write_file", "after": True}, "after=True"),
    ({"op": "write_file", "when": "during"}, "when='during'"),
])
def test_bad_faults_are_refused_naming_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fault(**kwargs)


def test_a_write_fault_leaves_a_torn_file_and_names_the_path(tmp_path):
    storage = FaultyStorage(faults=[Fault(op="write_file", match="b.bin", error=errno.ENOSPC, after=1)])
    storage.write_file(str(tmp_path / "a.bin"), [b"x" * 10])
    storage.write_file(str(tmp_path / "b.bin"), [b"1" * 10])  # the first match goes through (after=1)
    with pytest.raises(OSError) as err:
        storage.write_file(str(tmp_path / "b.bin"), [b"2" * 5, b"2" * 5])
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"22222"  # half the bytes: what a full disk leaves
    storage.write_file(str(tmp_path / "b.bin"), [b"3"])  # times=1: fired once
    assert storage.fired == [f"write_file {tmp_path / 'b.bin'}: {errno.ENOSPC}"]


def test_an_fsync_fault_lands_the_bytes_then_fails(tmp_path):
    storage = FaultyStorage(faults=[Fault(op="fsync", error=errno.EIO)])
    with pytest.raises(OSError, match="Input/output error"):
        storage.write_file(str(tmp_path / "f"), [b"abc"])
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_local_storage_names_the_file_when_fsync_fails(tmp_path, monkeypatch):
    """write() and fsync() raise OSErrors without a file name; LocalStorage adds it (a core fix)."""
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as err:
        LocalStorage().write_file(str(tmp_path / "x"), [b"abc"])
    assert err.value.filename == str(tmp_path / "x") and err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        LocalStorage().fsync_dir(str(tmp_path))
    assert err.value.filename == str(tmp_path)


def test_faults_fire_on_their_rank_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    storage = FaultyStorage(faults=[Fault(op="makedirs", rank=0, error=errno.EIO)])
    storage.makedirs(str(tmp_path / "d"))  # rank 1: untouched
    assert storage.fired == []
    storage.inject(Fault(op="rename", match="a -> ", rank=1, error=errno.EXDEV, when="after"))
    (tmp_path / "a").write_text("x")
    with pytest.raises(OSError, match="Invalid cross-device link"):
        storage.rename(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").exists(), "when='after': the rename happened, then the error"


# ---- a job meeting each fault in turn ------------------------------------------------------------

SCENARIOS = [
    # (name, fault, rank named, file named)
    ("ENOSPC writing tensors", Fault(op="write_file", match="model/replicated.part-", rank=1, error=errno.ENOSPC),
     1, "model/replicated.part-"),
    ("EIO writing a state file", Fault(op="write_file", match=".msgpack", rank=0, error=errno.EIO),
     0, ".msgpack"),
    ("fsync of a file fails", Fault(op="fsync", match="rng/", rank=1, error=errno.EIO), 1, "rng/rank-00001.msgpack"),
    ("fsync of a folder fails", Fault(op="fsync_dir", match="model", rank=0, error=errno.EIO), 0, "/model"),
    ("EIO writing the manifest", Fault(op="write_file", match="manifest.json.tmp", rank=0, error=errno.EIO),
     0, "checkpoint_manifest.json.tmp"),
    ("ENOSPC renaming into place", Fault(op="rename", match=".partial -> ", rank=0, error=errno.ENOSPC),
     0, ".partial"),
]


def _meet_each_fault(rank: int, world: int, run_dir: str) -> dict:
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=60, storage=storage)
    coord.save(10, _components(rank, 10))
    outcomes = []
    for i, (_, fault, _, _) in enumerate(SCENARIOS):
        step = 20 + i
        storage.inject(fault)
        try:
            coord.save(step, _components(rank, step))
            outcome = {"type": None}
        except CheckpointError as exc:
            outcome = {"type": type(exc).__name__, "message": str(exc), "failed": sorted(exc.failures)}
        storage.clear()
        outcome.update(latest=coord.latest().step, fired=len(storage.fired), dirs=sorted(os.listdir(run_dir)))
        outcomes.append(outcome)
    coord.save(100, _components(rank, 100))  # the job goes on after every failure
    return {"outcomes": outcomes, "final": [r.step for r in coord.checkpoints()]}


def test_storage_faults_fail_the_save_everywhere_naming_rank_and_file(tmp_path):
    results = expect_ok(run_ranks(2, _meet_each_fault, str(tmp_path)))
    for (name, _, bad_rank, file_part), *per_rank in zip(SCENARIOS, *(r["outcomes"] for r in results), strict=True):
        for rank, out in enumerate(per_rank):
            assert out["type"] == "CheckpointError", (name, rank, out)
            assert out["failed"] == [bad_rank], (name, out)
            assert f"failed on rank {bad_rank}" in out["message"] and file_part in out["message"], (name, out)
            assert "(injected)" in out["message"], (name, out)
            assert out["latest"] == 10, (name, out)
        # rank 0 removed the unfinished folder before raising: only the committed checkpoint and the lock remain
        assert per_rank[0]["dirs"] == [".ckpt.lock", "checkpoint-00000010"], (name, per_rank[0])
    assert results[0]["final"] == results[1]["final"] == [10, 100]
    for step in (10, 100):
        assert verify(open_checkpoint(tmp_path / f"checkpoint-{step:08d}"))["ok"]


# ---- a write that stalls past the timeout --------------------------------------------------------

SLOW_TIMEOUT = 2  # the coordinator's timeout; the slow write stalls well past it
SLOW_FOR = SLOW_TIMEOUT + 3


def _slow_write_then_go_on(rank: int, world: int, run_dir: str) -> dict:
    storage = FaultyStorage()
    # One file at a time: the note of the file a rank started last then names the stalled one (with more
    # threads, the files started after it are in flight too, and the last one started is named).
    coord = CheckpointCoordinator(run_dir, timeout=SLOW_TIMEOUT, storage=storage, io_threads=1)
    coord.save(10, _components(rank, 10))
    storage.inject(Fault(op="write_file", match="model/replicated.part-", rank=1, error=f"sleep:{SLOW_FOR}"))
    try:
        coord.save(20, _components(rank, 20))
        outcome = {"type": None}
    except CheckpointError as exc:
        outcome = {"type": type(exc).__name__, "message": str(exc), "missing": getattr(exc, "missing_ranks", None)}
    storage.clear()
    outcome["latest"] = coord.latest().step
    outcome["usable"] = coord.usable
    coord.close()
    # The old coordinator refuses to go on (its collectives may be out of step); a new one on every rank saves.
    with CheckpointCoordinator(run_dir, timeout=60, storage=storage) as fresh:
        fresh.save(30, _components(rank, 30))
        outcome["after"] = [r.step for r in fresh.checkpoints()]
    return outcome


def test_a_slow_write_is_a_storage_fault_named_by_rank_and_file(tmp_path):
    first, second = run_ranks(2, _slow_write_then_go_on, str(tmp_path), timeout=120)
    assert first["type"] == "CollectiveTimeoutError" and list(first["missing"]) == [1], first
    assert "'write' step" in first["message"] and "rank 1 never reached it" in first["message"], first
    stalled_on = first["message"].split("then was writing ", 1)[-1]
    assert stalled_on.startswith("model/replicated.part-1-of-2.safetensors"), first["message"]
    assert second["type"] in ("CollectiveTimeoutError", "CheckpointError"), second  # the slow rank, once back
    for res in (first, second):
        assert res["latest"] == 10 and res["after"] == [10, 30], res
        assert res["usable"] is False, res  # so a trainer with on_save_error="warn" raises instead of going on
    for step in (10, 30):
        assert verify(open_checkpoint(tmp_path / f"checkpoint-{step:08d}"))["ok"]
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "checkpoint-00000010", "checkpoint-00000030"]


# ---- read-side faults ------------------------------------------------------------------------------

READ_FAULTS = [
    # (name, fault, rank named, file named)
    ("EIO opening a tensor file", Fault(op="open_read", match="model/replicated.part-", rank=1), 1,
     "model/replicated.part-"),
    ("EIO opening the manifest", Fault(op="open_read", match="checkpoint_manifest.json", rank=0), 0,
     "checkpoint-00000010/checkpoint_manifest.json"),
    ("EIO listing the run dir", Fault(op="list_dir", rank=0), 0, "'RUN_DIR'"),
]


def _meet_each_read_fault(rank: int, world: int, run_dir: str) -> list[dict]:
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=60, storage=storage)
    coord.save(10, _components(rank, 10))
    outcomes = []
    for _, fault, _, _ in READ_FAULTS:
        live = [StateComponent(c.key, Box({"untouched": torch.zeros(1)}), c.sharing_pattern)
                for c in _components(rank, 0)]
        storage.inject(fault)
        try:
            coord.load(live)
            outcome = {"type": None}
        except CheckpointError as exc:
            outcome = {"type": type(exc).__name__, "message": str(exc), "failed": sorted(exc.failures)}
        storage.clear()
        outcome.update(untouched=all(list(c.stateful.state) == ["untouched"] for c in live))
        outcomes.append(outcome)
    live = _components(rank, 0)
    coord.load(live)  # the faults were passing: the same coordinator loads once they are gone
    outcomes.append({"model": live[0].stateful.state["w0"].tolist()[:1]})
    return outcomes


def test_read_faults_fail_the_load_everywhere_naming_rank_and_file_and_apply_nothing(tmp_path):
    results = expect_ok(run_ranks(2, _meet_each_read_fault, str(tmp_path)))
    for (name, _, bad_rank, file_part), *per_rank in zip(READ_FAULTS, *results, strict=False):
        file_part = file_part.replace("RUN_DIR", str(tmp_path))
        for rank, out in enumerate(per_rank):
            assert out["type"] == "CheckpointError" and out["failed"] == [bad_rank], (name, rank, out)
            assert f"failed on rank {bad_rank}" in out["message"] and file_part in out["message"], (name, out)
            assert "Input/output error (injected)" in out["message"], (name, out)
            assert out["untouched"], (name, rank, "a failed load applied nothing")
    assert [r[-1] for r in results] == [{"model": [100.0]}] * 2
