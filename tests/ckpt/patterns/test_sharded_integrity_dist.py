"""A flipped byte inside a saved SHARDED piece, on real gloo ranks: a load at the saved world size, at 1 rank and
at 4 ranks (where the damaged rows are read as part of a piece) fails on every rank with a
CorruptCheckpointError naming the component, the tensor and the file, and leaves every live tensor as it was;
`ckpt verify` names the damaged tensor too."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ckpt import CheckpointCoordinator, CorruptCheckpointError, SharingPattern, StateComponent, read_manifest
from tests.support.distributed import expect_ok, run_ranks
from trainers.fsdp import OptimizerByName

ROWS, COLS = 1200, 512  # 2.4 MB of weight: each saved piece (600 rows) spans 5 digest blocks of 256 KiB
DAMAGED_ROW = 450  # inside saved rank 0's piece, read at 4 ranks only by rank 1 (rows 300..599), part way


def _build(layout: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(COLS, ROWS), torch.nn.Linear(ROWS, 4))
    if layout == "fsdp":
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, COLS)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _components(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [StateComponent("model", model, SharingPattern.SHARDED),
            StateComponent("optim", OptimizerByName(opt, model), SharingPattern.SHARDED)]


def _local_values(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's own values of every weight and optimizer state tensor (copies)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    out = {n: local(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out.update({f"{n}/{k}": local(v) for k, v in opt.state[p].items()})
    return out


def _save(rank: int, world: int, run_dir: str) -> None:
    model, opt = _build("fsdp", seed=0)
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, _components(model, opt))


def _load(rank: int, world: int, run_dir: str) -> dict:
    model, opt = _build("fsdp" if world > 1 else "plain", seed=5)
    before = _local_values(model, opt)
    try:
        with CheckpointCoordinator(run_dir, timeout=60) as coord:
            coord.load(_components(model, opt))
    except CorruptCheckpointError as exc:
        after = _local_values(model, opt)
        unchanged = all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
        dist.barrier()
        return {"message": str(exc), "component": exc.component, "path": exc.path, "unchanged": unchanged}
    return {"message": None}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[str, str]:
    """A 2-rank FSDP2 checkpoint with one byte flipped in row DAMAGED_ROW of the first layer's weight."""
    run_dir = str(tmp_path_factory.mktemp("sharded") / "run")
    expect_ok(run_ranks(2, _save, run_dir))
    ckpt_dir = os.path.join(run_dir, "checkpoint-00000001")
    (piece,) = [p for p in read_manifest(ckpt_dir).components["model"].tensors["0.weight"].pieces if p.offsets[0] == 0]
    assert piece.lengths == (600, COLS) and len(piece.digests) == 5
    path = os.path.join(ckpt_dir, piece.file)
    with open(path, "r+b") as f:
        f.seek(piece.begin + DAMAGED_ROW * COLS * 4 + 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return run_dir, piece.file


@pytest.mark.parametrize("world", [2, 1, 4])
def test_a_flipped_byte_in_a_piece_fails_the_load_on_every_rank_and_changes_nothing(damaged, world):
    run_dir, file = damaged
    results = expect_ok(run_ranks(world, _load, run_dir))
    for r in results:
        assert r["message"] is not None, "the damaged piece was loaded"
        assert r["component"] == "model" and r["unchanged"], r
        assert "'0.weight'" in r["message"] and os.path.basename(file) in r["message"], r["message"]


def test_ckpt_verify_names_the_damaged_tensor(damaged, capsys):
    from ckpt.cli import main

    run_dir, file = damaged
    capsys.readouterr()
    assert main(["verify", os.path.join(run_dir, "checkpoint-00000001"), "--json"]) == 1
    rows = {f["path"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert rows[file]["status"] == "digest mismatch" and rows[file]["component"] == "model"
    assert "tensor '0.weight'" in rows[file]["detail"], rows[file]
    assert all(row["status"] == "ok" for path, row in rows.items() if path != file), [(p, r["status"], r["detail"]) for p, r in rows.items()]
