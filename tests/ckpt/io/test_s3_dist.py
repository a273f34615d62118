"""Run dirs on object storage, with real gloo ranks against a real S3 server over HTTP (moto on 127.0.0.1):
saving, retaining and loading every pattern, a job killed mid-upload, the server stopped mid-save, two jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from ckpt import CheckpointCoordinator, RetentionPolicy, RunDirInUseError, SharingPattern, StateComponent
from ckpt.io.s3 import S3Options, S3Storage
from tests.support.distributed import expect_ok, failures, run_ranks
from tests.support.s3 import AWS_ENV, fresh_url, gated_storage, killing_storage, start_server
from tests.support.workers import Box, make_model, rich_state, same, snapshot

pytest.importorskip("moto.server")

BIG = 3_000_000  # float32 elements: 12 MB, several 5 MiB parts per file


def _components(rank: int, step: int) -> list[StateComponent]:
    model, opt = make_model(seed=step)  # identical on every rank
    big = torch.randn(BIG, generator=torch.Generator().manual_seed(step))
    return [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("big", Box({"w": big}), SharingPattern.REPLICATED),
        StateComponent("per_rank", Box(rich_state(10 * rank + step)), SharingPattern.PER_RANK),
        # GLOBAL: every rank holds a different value; every rank must load rank 0's.
        StateComponent("global", Box(rich_state(100 * step + rank)), SharingPattern.GLOBAL),
    ]


def _expected(rank: int, step: int) -> dict:
    out = {c.key: snapshot(c.stateful) for c in _components(rank, step)}
    out["global"] = rich_state(100 * step)
    return out


def _fresh() -> list[StateComponent]:
    model, opt = make_model(seed=99)
    return [StateComponent("model", model, SharingPattern.REPLICATED),
            StateComponent("optimizer", opt, SharingPattern.REPLICATED),
            *[StateComponent(k, Box({}), p) for k, p in (("big", SharingPattern.REPLICATED),
                                                          ("per_rank", SharingPattern.PER_RANK),
                                                          ("global", SharingPattern.GLOBAL))]]


def _matches(comps: list[StateComponent], expected: dict) -> dict[str, bool]:
    return {c.key: same(snapshot(c.stateful), expected[c.key]) for c in comps}


def _save_retain_load(rank: int, world: int, url: str) -> dict:
    storage = S3Storage(S3Options(part_bytes=5 << 20))
    with CheckpointCoordinator(url, storage=storage, retention=RetentionPolicy(save_total_limit=2), timeout=90) as coord:
        for step in (1, 2, 3):
            coord.save(step, _components(rank, step), metrics={"loss": 1 / step}, async_save=step == 2)
        coord.wait()
        steps = [r.step for r in coord.checkpoints()]
        latest, older = _fresh(), _fresh()
        got = coord.load(latest)
        got_older = coord.load(older, checkpoint=2)
    return {"steps": steps, "latest": (got.step, _matches(latest, _expected(rank, 3))),
            "older": (got_older.step, _matches(older, _expected(rank, 2)))}


@pytest.mark.parametrize("world", [2, 4])
def test_every_pattern_saves_retains_and_loads_on_s3(s3_server, s3_run, world):
    results = expect_ok(run_ranks(world, _save_retain_load, s3_run, timeout=300))
    for r in results:
        assert r["steps"] == [2, 3]
        for step, matched in (r["latest"], r["older"]):
            assert all(matched.values()), (step, matched)
    assert results[0]["latest"][0] == 3 and results[0]["older"][0] == 2
    keys = s3_server.keys(s3_run)
    assert not any(k.startswith("checkpoint-00000001/") for k in keys)  # retention removed step 1 entirely
    assert {k.split("/")[0] for k in keys if k.startswith("checkpoint-")} == {"checkpoint-00000002",
                                                                               "checkpoint-00000003"}
    per_rank = {k for k in keys if k.startswith("checkpoint-00000003/per_rank/")}
    assert len([k for k in per_rank if k.endswith(".msgpack")]) == world  # one file per rank
    assert s3_server.uploads(s3_run) == [] and ".ckpt.lock" not in keys  # lock released at close


def _save_then_die(rank: int, world: int, url: str) -> None:
    with CheckpointCoordinator(url, storage=S3Storage(S3Options(part_bytes=5 << 20, lock_lease_s=2)),
                               timeout=60) as coord:
        coord.save(1, _components(rank, 1))
    # Every rank kills itself part way through uploading its own large file, with parts in flight.
    coord = CheckpointCoordinator(url, storage=killing_storage(lease_s=2, match="own/", after_bytes=7 << 20),
                                  timeout=60)
    own = StateComponent("own", Box({"w": torch.randn(BIG, generator=torch.Generator().manual_seed(rank))}),
                         SharingPattern.PER_RANK)
    coord.save(2, [*_components(rank, 2), own])


def _resume(rank: int, world: int, url: str) -> dict:
    deadline = time.monotonic() + 60
    while True:  # the dead job's lock expires 2 s after its last renewal
        try:
            coord = CheckpointCoordinator(url, storage=S3Storage(S3Options(lock_lease_s=2)), timeout=60)
            break
        except RunDirInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    comps = _fresh()
    got = coord.load(comps)
    coord.close()
    return {"step": got.step, "matched": _matches(comps, _expected(rank, 1))}


def test_sigkill_during_upload_keeps_latest_and_the_next_job_cleans_up(s3_server, s3_run):
    dead = failures(run_ranks(2, _save_then_die, s3_run, timeout=240))
    assert sorted(dead) == [0, 1] and all(f.type_name == "RankDied" for f in dead.values()), dead
    left = [k for k in s3_server.keys(s3_run) if k.startswith("checkpoint-00000002/")]
    uploads = s3_server.uploads(s3_run)
    assert len(uploads) >= 2, "every rank was meant to die mid-upload"
    assert "checkpoint-00000002/checkpoint_manifest.json" not in left
    for r in expect_ok(run_ranks(2, _resume, s3_run, timeout=240)):
        assert r["step"] == 1 and all(r["matched"].values()), r
    assert not [k for k in s3_server.keys(s3_run) if k.startswith("checkpoint-00000002/")]
    assert s3_server.uploads(s3_run) == []


def _save_into_stopped_server(rank: int, world: int, url: str, marker_dir: str) -> None:
    coord = CheckpointCoordinator(url, storage=S3Storage(S3Options(max_attempts=2)), timeout=120)
    coord.save(1, _components(rank, 1))
    coord = CheckpointCoordinator(url, storage=gated_storage(marker_dir, "per_rank/"), timeout=120)
    coord.save(2, _components(rank, 2))


def test_server_stopped_mid_save_is_one_error_on_every_rank_and_commits_nothing(tmp_path):
    server = start_server()
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint}
    url = fresh_url()

    def stop_when_ready() -> None:  # every rank is about to upload its own file: the server goes away
        while len([n for n in os.listdir(tmp_path) if n.startswith("ready-")]) < 2:
            time.sleep(0.05)
        server.server.stop()
        (tmp_path / "go").touch()

    stopper = threading.Thread(target=stop_when_ready, daemon=True)
    stopper.start()
    bad = failures(run_ranks(2, _save_into_stopped_server, url, str(tmp_path), env=env, timeout=240))
    stopper.join(timeout=10)
    assert sorted(bad) == [0, 1], bad
    assert bad[0].type_name == bad[1].type_name == "CheckpointError"
    assert bad[0].message == bad[1].message  # the same error on every rank
    assert "during 'write'" in bad[0].message and "is the S3 endpoint up and reachable" in bad[0].message
    assert bad[0].message.count("is the S3 endpoint up") <= 2  # said once per failed rank, not per part
    again = start_server()  # moto keeps its data in this process: the new server sees what was written
    try:
        keys = again.keys(url)
        assert "checkpoint-00000001/checkpoint_manifest.json" in keys
        assert "checkpoint-00000002/checkpoint_manifest.json" not in keys
    finally:
        again.server.stop()


HOLDER = """
    import sys, time
    from ckpt import CheckpointCoordinator
    from ckpt.io.s3 import S3Options, S3Storage
    c = CheckpointCoordinator(sys.argv[1], storage=S3Storage(S3Options(lock_lease_s=3)))
    print("holding", flush=True)
    time.sleep(600)
"""


def _start(rank: int, world: int, url: str) -> None:
    CheckpointCoordinator(url, timeout=30)


def test_a_second_job_is_refused_and_a_dead_jobs_lock_expires(s3_server, s3_run):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), s3_run], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "holding"
        bad = failures(run_ranks(2, _start, s3_run))  # a second job: both ranks refused
        assert sorted(bad) == [0, 1]
        for f in bad.values():
            assert f.type_name == "RunDirInUseError" and f"pid {holder.pid} on host" in f.message, f
    finally:
        holder.kill()
        holder.wait(timeout=60)
    deadline = time.monotonic() + 60
    while True:  # nothing renews the dead holder's lease now: it runs out
        try:
            CheckpointCoordinator(s3_run).close()
            break
        except RunDirInUseError:
            assert time.monotonic() < deadline, "the dead job's lock never expired"
            time.sleep(0.5)


def test_fsdp2_sharded_state_on_s3_loads_at_another_world_size(s3_server, s3_run):
    """SHARDED on object storage: 2 FSDP2 ranks upload their own shards; 1 plain rank and 4 FSDP2 ranks read
    back only their byte ranges (ranged GETs), exact by value."""
    import numpy as np

    from tests.support.sharded import load_worker, save_worker

    saved = expect_ok(run_ranks(2, save_worker, s3_run, "fsdp", "fqn", timeout=300))[0]
    for world, layout in ((1, "plain"), (4, "fsdp")):
        for loaded in expect_ok(run_ranks(world, load_worker, s3_run, layout, "fqn", timeout=300)):
            assert loaded["world"] == world
            for name, value in saved.items():
                assert np.array_equal(loaded[name], value), (world, name)
            assert np.array_equal(loaded["extra"]["table"], np.arange(6.0, dtype=np.float32))


def _sharded_save_and_retain(rank: int, world: int, url: str) -> dict:
    """4 FSDP2 ranks train and save SHARDED state at steps 1-3 (step 2 in the background) with retention."""
    from tests.support.sharded import build, components, full_values, train_step

    torch.set_num_threads(1)
    model = build("fsdp", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = {}
    storage = S3Storage(S3Options(part_bytes=5 << 20))
    with CheckpointCoordinator(url, storage=storage, retention=RetentionPolicy(save_total_limit=2), timeout=120) as coord:
        for step in (1, 2, 3):
            train_step(model, opt, seed=step)
            extra = Box({"epoch": step, "table": torch.arange(6.0), "name": "run"})
            coord.save(step, components(model, opt, "fqn", extra), async_save=step == 2)
            saved[step] = full_values(model, opt)  # the next step changes the live shards; the staged copy is written
        coord.wait()
        steps = [r.step for r in coord.checkpoints()]
    return {"steps": steps, "latest": saved[3]}


def test_four_fsdp2_ranks_save_and_retain_sharded_state_on_s3_and_two_load_it(s3_server, s3_run):
    """SHARDED saved by 4 ranks (one save in the background), retention on the bucket, and a load at 2 ranks
    that reads only its byte ranges: exact by value."""
    import numpy as np

    from tests.support.sharded import load_worker

    results = expect_ok(run_ranks(4, _sharded_save_and_retain, s3_run, timeout=400))
    assert all(r["steps"] == [2, 3] for r in results)
    keys = s3_server.keys(s3_run)
    assert {k.split("/")[0] for k in keys if k.startswith("checkpoint-")} == {"checkpoint-00000002",
                                                                               "checkpoint-00000003"}
    assert s3_server.uploads(s3_run) == [] and ".ckpt.lock" not in keys
    saved = results[0]["latest"]
    for loaded in expect_ok(run_ranks(2, load_worker, s3_run, "fsdp", "fqn", timeout=300)):
        assert loaded["world"] == 2 and loaded["extra"]["epoch"] == 3
        for name, value in saved.items():
            assert np.array_equal(loaded[name], value), name
