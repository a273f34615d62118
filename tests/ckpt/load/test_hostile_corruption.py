"""Damaged checkpoints: every flipped byte, truncation or missing file is caught on load and by `ckpt
verify`, naming the file, before any live state changes; with strict=False an optional component whose
files are damaged is skipped (on every rank) instead of failing the load."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SharingPattern,
    StateComponent,
)
from ckpt.cli import main as ckpt_main
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.format.layout import MANIFEST_NAME
from ckpt.format.manifest_read import read_manifest
from ckpt.io.storage import LocalStorage
from tests.support.distributed import expect_ok, run_ranks
from tests.support.hostile import make_checkpoint, saved_state, targets, untouched
from tests.support.workers import Box, same


def _files(ckpt_dir: str) -> dict[str, int]:
    """Every file of the checkpoint (relative path -> size), the manifest included."""
    out = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, ckpt_dir).replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(out.items()))


def _flip(path: str, pos: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ mask]))


def _check_every_flip(tmp_path, masks: tuple[int, ...]) -> int:
    ckpt_dir = make_checkpoint(tmp_path)
    original = read_manifest(LocalStorage(), ckpt_dir)
    checked = 0
    with CheckpointCoordinator(tmp_path) as coord:
        for relpath, size in _files(ckpt_dir).items():
            path = os.path.join(ckpt_dir, relpath)
            for pos in range(size):
                for mask in masks:
                    _flip(path, pos, mask)
                    comps = targets()
                    try:
                        coord.load(comps, checkpoint=ckpt_dir)
                    except CheckpointError as exc:
                        assert relpath in str(exc), (relpath, pos, mask, str(exc))
                        assert untouched(comps), (relpath, pos, mask)
                    else:  # only a manifest flip that leaves its meaning identical may pass (e.g. 1e5 -> 1E5)
                        assert relpath == MANIFEST_NAME and read_manifest(LocalStorage(), ckpt_dir) == original, (
                            relpath, pos, mask)
                    if relpath != MANIFEST_NAME:
                        report = verify(open_checkpoint(ckpt_dir))
                        bad = [f["path"] for f in report["files"] if f["status"] != "ok"]
                        assert bad == [relpath], (relpath, pos, mask, report)
                    _flip(path, pos, mask)  # restore
                    checked += 1
        loaded = targets()
        coord.load(loaded, checkpoint=ckpt_dir)  # restored: loads again, exactly
    assert all(same(c.stateful.state, saved_state()[c.key]) for c in loaded)
    return checked


def test_every_flipped_byte_is_caught_naming_the_file(tmp_path):
    """Each byte of each file (tensors, state, manifest), flipped in its lowest and highest bit."""
    assert _check_every_flip(tmp_path, (0x01, 0x80)) > 3000


@pytest.mark.slow
def test_every_flipped_bit_is_caught_naming_the_file(tmp_path):
    assert _check_every_flip(tmp_path, tuple(1 << b for b in range(8))) > 15000


def test_truncated_files_are_caught_naming_the_file(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    with CheckpointCoordinator(tmp_path) as coord:
        for relpath, size in _files(ckpt_dir).items():
            path = os.path.join(ckpt_dir, relpath)
            with open(path, "rb") as f:
                data = f.read()
            for keep in sorted({0, 1, 8, size // 2, size - 1}):
                with open(path, "wb") as f:
                    f.write(data[:keep])
                comps = targets()
                if relpath == MANIFEST_NAME and not data[keep:].strip():
                    coord.load(comps, checkpoint=ckpt_dir)  # only trailing whitespace gone: the same manifest
                    continue
                with pytest.raises(CheckpointError) as err:
                    coord.load(comps, checkpoint=ckpt_dir)
                assert relpath in str(err.value) and untouched(comps), (relpath, keep, str(err.value))
                if relpath == MANIFEST_NAME:
                    assert ckpt_main(["verify", ckpt_dir]) == 2
                else:
                    report = verify(open_checkpoint(ckpt_dir))
                    assert [(f["path"], f["status"]) for f in report["files"] if f["status"] != "ok"] == [
                        (relpath, "wrong size")]
            with open(path, "wb") as f:
                f.write(data)


def test_missing_files_are_caught_naming_the_file(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    with CheckpointCoordinator(tmp_path) as coord:
        for relpath in _files(ckpt_dir):
            path = os.path.join(ckpt_dir, relpath)
            os.rename(path, path + ".away")
            comps = targets()
            if relpath == MANIFEST_NAME:  # no manifest: not a committed checkpoint at all
                assert coord.latest() is None
                with pytest.raises(CheckpointNotFoundError, match=f"holds no {MANIFEST_NAME}"):
                    coord.load(comps, checkpoint=ckpt_dir)
            else:
                with pytest.raises(CorruptCheckpointError, match="is missing") as err:
                    coord.load(comps, checkpoint=ckpt_dir)
                assert relpath in str(err.value)
                report = verify(open_checkpoint(ckpt_dir))
                assert [(f["path"], f["status"]) for f in report["files"] if f["status"] != "ok"] == [
                    (relpath, "missing")]
            assert untouched(comps)
            os.rename(path + ".away", path)


def test_ckpt_verify_names_a_flipped_file(tmp_path, capsys):
    ckpt_dir = make_checkpoint(tmp_path)
    _flip(os.path.join(ckpt_dir, "model", "replicated.part-0-of-1.safetensors"), 100, 0x04)
    assert ckpt_main(["verify", ckpt_dir]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 of 4 files" in out and "model/replicated.part-0-of-1.safetensors" in out
    assert "digest mismatch" in out


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_optional_component_is_skipped_with_strict_false(tmp_path, damage):
    ckpt_dir = make_checkpoint(tmp_path)
    victim = os.path.join(ckpt_dir, "extra", "global.safetensors")
    if damage == "flip":
        _flip(victim, 90 if os.path.getsize(victim) > 90 else 70, 0x10)
    elif damage == "truncate":
        os.truncate(victim, 10)
    else:
        os.remove(victim)
    with CheckpointCoordinator(tmp_path) as coord:
        for required, strict in ((True, False), (False, True)):
            comps = targets(extra_required=required)
            with pytest.raises(CorruptCheckpointError, match=r"extra/global\.safetensors"):
                coord.load(comps, checkpoint=ckpt_dir, strict=strict)
            assert untouched(comps), (required, strict)
        comps = targets(extra_required=False)
        result = coord.load(comps, checkpoint=ckpt_dir, strict=False)
    assert result.damaged == ("extra",) and "extra" in result.skipped and result.loaded == ("model",)
    assert same(comps[0].stateful.state, saved_state()["model"])
    assert list(comps[1].stateful.state) == ["untouched"], "the skipped component kept its live state"


def _damaged_per_rank_file(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    comps = [StateComponent("model", Box({"w": torch.arange(8.0)}), SharingPattern.REPLICATED),
             StateComponent("stats", Box({"n": torch.tensor([rank])}), SharingPattern.PER_RANK, required=False)]
    path = coord.save(1, comps)
    coord.comm.all_gather(None, "test barrier")
    if rank == 0:  # only rank 1's copy is damaged
        with open(os.path.join(path, "stats", "rank-00001.safetensors"), "r+b") as f:
            f.truncate(12)
    coord.comm.all_gather(None, "test barrier")
    live = [StateComponent("model", Box({}), SharingPattern.REPLICATED),
            StateComponent("stats", Box({"live": True}), SharingPattern.PER_RANK, required=False)]
    result = coord.load(live, strict=False)
    return {"damaged": list(result.damaged), "stats": live[1].stateful.state,
            "model": live[0].stateful.state["w"].tolist()}


@pytest.mark.slow
def test_an_optional_component_damaged_on_one_rank_is_skipped_on_every_rank(tmp_path):
    results = expect_ok(run_ranks(2, _damaged_per_rank_file, str(tmp_path)))
    for res in results:
        assert res["damaged"] == ["stats"] and res["stats"] == {"live": True}, res
        assert res["model"] == torch.arange(8.0).tolist()
