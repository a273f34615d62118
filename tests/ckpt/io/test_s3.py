"""Object storage in one process, against a real S3 server over HTTP (moto on 127.0.0.1): the commit without
rename, deletion order, overwrite, the `ckpt` command on s3:// URLs, and the error when boto3 is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ckpt import CheckpointCoordinator, CheckpointError, RetentionPolicy, SharingPattern, StateComponent
from ckpt.cli import main
from ckpt.format.layout import MANIFEST_NAME
from ckpt.io.s3 import S3Storage
from ckpt.io.storage import LocalStorage, is_inside, norm_path
from ckpt.testing import Fault, FaultyStorage
from tests.support.cli import cli_json
from tests.support.s3 import BUCKET
from tests.support.workers import Box

pytest.importorskip("moto.server")


def _comps(step: int) -> list[StateComponent]:
    return [StateComponent("model", Box({"w": torch.arange(1000, dtype=torch.float32) * step, "n": step}),
                           SharingPattern.GLOBAL)]


def _load(coord: CheckpointCoordinator, checkpoint="latest") -> dict:
    box = Box({})
    coord.load([StateComponent("model", box, SharingPattern.GLOBAL)], checkpoint=checkpoint)
    return box.state


def _key(url: str, rel: str) -> str:
    return url[len(f"s3://{BUCKET}/"):] + "/" + rel


def test_the_manifest_is_created_once_so_two_writers_cannot_both_commit(s3_server, s3_run):
    storage = S3Storage.shared()
    target = f"{s3_run}/x/{MANIFEST_NAME}"
    storage.write_new(target, b"first")
    with pytest.raises(FileExistsError):
        storage.write_new(target, b"second")
    assert s3_server.client.get_object(Bucket=BUCKET, Key=_key(s3_run, f"x/{MANIFEST_NAME}"))["Body"].read() == b"first"

    class OtherWriterFirst(S3Storage):
        """Another writer commits step 1 between this save's writes and its commit."""

        def write_new(self, path: str, data: bytes) -> None:
            s3_server.client.put_object(Bucket=BUCKET, Key=_key(s3_run, f"checkpoint-00000001/{MANIFEST_NAME}"),
                                        Body=b"theirs")
            super().write_new(path, data)

    with CheckpointCoordinator(s3_run, storage=OtherWriterFirst()) as coord, \
            pytest.raises(CheckpointError, match="committed by another writer during this save"):
        coord.save(1, _comps(1))
    body = s3_server.client.get_object(Bucket=BUCKET, Key=_key(s3_run, f"checkpoint-00000001/{MANIFEST_NAME}"))
    assert body["Body"].read() == b"theirs"  # theirs stands, and its folder was not emptied by our failure
    assert any(k.startswith("checkpoint-00000001/model/") for k in s3_server.keys(s3_run))


def test_retention_deletes_the_manifest_first_and_the_next_owner_removes_the_rest(s3_server, s3_run):
    faulty = FaultyStorage(S3Storage.shared(), [Fault(op="remove_tree", match="checkpoint-00000001")])
    with CheckpointCoordinator(s3_run, storage=faulty, retention=RetentionPolicy(save_total_limit=1)) as coord:
        coord.save(1, _comps(1))
        coord.save(2, _comps(2))
        assert coord.last_retention.failed and [r.step for r in coord.checkpoints()] == [2]
    left = [k for k in s3_server.keys(s3_run) if k.startswith("checkpoint-00000001/")]
    assert left and f"checkpoint-00000001/{MANIFEST_NAME}" not in left  # uncommitted first, data still there
    code = main(["ls", s3_run, "--json"])
    assert code == 0
    with CheckpointCoordinator(s3_run) as coord:  # the run dir's next owner removes what is left
        assert [r.step for r in coord.checkpoints()] == [2] and _load(coord)["n"] == 2
    assert not [k for k in s3_server.keys(s3_run) if k.startswith("checkpoint-00000001/")]


def test_overwrite_replaces_a_committed_checkpoint_in_place(s3_server, s3_run):
    with CheckpointCoordinator(s3_run) as coord:
        coord.save(1, _comps(1))
        with pytest.raises(CheckpointError, match="already exists"):
            coord.save(1, _comps(5))
        assert _load(coord)["n"] == 1  # the refused save left the committed one alone
        coord.save(1, _comps(7), overwrite=True)
        state = _load(coord, 1)
    assert state["n"] == 7 and torch.equal(state["w"], torch.arange(1000, dtype=torch.float32) * 7)


def test_the_ckpt_command_on_s3_urls(s3_server, s3_run, tmp_path, capsys):
    with CheckpointCoordinator(s3_run, retention=RetentionPolicy(save_total_limit=3)) as coord:
        for step in (1, 2, 3):
            coord.save(step, _comps(step), metrics={"loss": 1.0 / step})
    s3_server.client.put_object(Bucket=BUCKET, Key=_key(s3_run, "checkpoint-00000004/model/global.msgpack"),
                                Body=b"left by a save that died")
    code, ls = cli_json(capsys, "ls", s3_run + "/")
    assert code == 0 and [r["step"] for r in ls["checkpoints"] if not r["partial"]] == [1, 2, 3]
    assert [(r["name"], r["nbytes"]) for r in ls["checkpoints"] if r["partial"]] == [("checkpoint-00000004", 24)]
    ck2 = f"{s3_run}/checkpoint-00000002"
    code, info = cli_json(capsys, "inspect", ck2)
    assert code == 0 and info["step"] == 2 and info["metrics"] == {"loss": 0.5}
    code, report = cli_json(capsys, "verify", ck2)
    assert code == 0 and report["ok"] and report["checked"] == 2
    bad = _key(s3_run, "checkpoint-00000002/model/global.safetensors")
    data = bytearray(s3_server.client.get_object(Bucket=BUCKET, Key=bad)["Body"].read())
    data[-1] ^= 0xFF
    s3_server.client.put_object(Bucket=BUCKET, Key=bad, Body=bytes(data))
    code, report = cli_json(capsys, "verify", ck2)
    assert code == 1 and [f["status"] for f in report["files"] if f["status"] != "ok"] == ["digest mismatch"]
    out = tmp_path / "model.safetensors"
    code, _ = cli_json(capsys, "export", f"{s3_run}/checkpoint-00000003", "--component", "model", "-o", str(out))
    assert code == 0 and torch.equal(load_file(out)["w"], torch.arange(1000, dtype=torch.float32) * 3)
    code, _ = cli_json(capsys, "pin", f"{s3_run}/checkpoint-00000001")
    assert code == 0
    code, pruned = cli_json(capsys, "prune", s3_run, "--save-total-limit", "1")
    assert code == 0 and [d["path"] for d in pruned["deleted"]] == [ck2]  # 1 is pinned, 3 is the newest
    assert not [k for k in s3_server.keys(s3_run) if k.startswith("checkpoint-00000002/")]
    code, err = cli_json(capsys, "ls", f"s3://{BUCKET}/no-such-run")
    assert code == 2 and "does not exist" in err["error"]
    # The run's picture from the bucket: every checkpoint marked (2 was pruned: it is no longer listed).
    page = tmp_path / "report.html"
    code, drawn = cli_json(capsys, "report", s3_run, "-o", str(page))
    assert code == 0 and sorted(m["step"] for m in drawn["checkpoints"]) == [1, 3]
    assert "<svg" in page.read_text()


def _prune_in_another_process(url: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "ckpt.cli", "prune", url, "--save-total-limit", "1", "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    return proc.returncode, json.loads(proc.stdout)


def test_a_live_jobs_lock_refuses_ckpt_prune_from_another_process(s3_server, s3_run):
    with CheckpointCoordinator(s3_run) as coord:
        coord.save(1, _comps(1))
        coord.save(2, _comps(2))
        code, out = _prune_in_another_process(s3_run)
        assert code == 2 and "in use by a live job" in out["error"] and f"pid {os.getpid()}" in out["error"]
    code, out = _prune_in_another_process(s3_run)  # the job closed: its lock object is gone
    assert code == 0 and [d["path"] for d in out["deleted"]] == [f"{s3_run}/checkpoint-00000001"]


def test_paths_on_object_storage_compare_and_stay_inside():
    assert norm_path("s3://b//run/./ck/") == "s3://b/run/ck"
    assert is_inside("s3://b/run/ck", "s3://b/run/ck/model/x.safetensors")
    assert not is_inside("s3://b/run/ck", "s3://b/run/ck/../other/x.safetensors")
    assert not is_inside("s3://b/run/ck", "s3://b/run/ck2/x")


def test_without_boto3_the_error_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from ckpt import CheckpointCoordinator\n"
            "CheckpointCoordinator('s3://bucket/run')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install 'ckpt[s3]'" in proc.stderr.strip().splitlines()[-1]


def test_local_storage_has_the_same_create_only_and_replace_operations(tmp_path):
    storage = LocalStorage()
    target = str(tmp_path / MANIFEST_NAME)
    storage.write_new(target, b"first")
    with pytest.raises(FileExistsError):
        storage.write_new(target, b"second")
    assert (tmp_path / MANIFEST_NAME).read_bytes() == b"first"
    storage.replace_file(target, b"third")
    assert (tmp_path / MANIFEST_NAME).read_bytes() == b"third"
    assert os.listdir(tmp_path) == [MANIFEST_NAME]  # no temporary files left behind
