"""Workers for FSDP2 over a tensor-parallel model on a 2 x 2 (dp, tp) mesh: column-parallel weights carry
FSDP2's strided placement (_StridedShard on "dp", Shard on "tp"). Saved SHARDED and loaded at other layouts,
with the full values returned for comparison; and a strided layout that is not one box per rank, refused."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support.sharded import full_values, train_step
from tests.support.workers import Box
from trainers.fsdp import OptimizerByName


def build_layout(layout: str, seed: int) -> torch.nn.Module:
    """5 -> 8 -> 3 linear layers with the weights of `seed`, laid out `plain`, `fsdp` (FSDP2 over every rank) or
    `fsdp_tp` (4 ranks: layer 0 column-parallel, layer 2 row-parallel over "tp", each layer then `fully_shard`
    over "dp"). The tp split is even (torch's FSDP2 does not run uneven strided shards); dp splits layer 2's 3
    rows unevenly."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    if layout == "plain":
        return model
    mesh = None
    if layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        mesh = mesh["dp"]
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _components(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [StateComponent("model", model, SharingPattern.SHARDED),
            StateComponent("optim", OptimizerByName(opt, model), SharingPattern.SHARDED)]


def save_worker(rank: int, world: int, run_dir: str, layout: str) -> dict[str, Any]:
    """One AdamW step under `layout`, saved at step 1; the full values saved, and the placements seen."""
    model = build_layout(layout, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, opt, seed=1)
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, _components(model, opt))
    placements = {n: [type(p).__name__ for p in t.placements] for n, t in model.named_parameters()
                  if isinstance(t, DTensor)}
    return {"values": full_values(model, opt), "placements": placements}


def load_worker(rank: int, world: int, run_dir: str, layout: str) -> dict[str, Any]:
    """Other weights under `layout` (after a step, so the optimizer has state to overwrite), the checkpoint
    loaded; the full values."""
    model = build_layout(layout, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, opt, seed=9)
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.load(_components(model, opt))
    return full_values(model, opt)


def _not_one_box(rank: int) -> DTensor:
    """A strided shard with nothing splitting it further: each rank holds two separate pieces of dimension 0."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    local = torch.arange(4.0).reshape(2, 2) + 10 * rank
    return DTensor.from_local(local, mesh, [_StridedShard(0, split_factor=2)], run_check=False,
                              shape=torch.Size([4, 2]), stride=(2, 1))


def refuse_worker(rank: int, world: int, run_dir: str, phase: str) -> Any:
    """`save`: such a DTensor saved SHARDED (refused). `load`: a plain tensor saved, then loaded into such a
    DTensor (refused; the live tensor is returned to check it is unchanged)."""
    t = _not_one_box(rank)
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        if phase == "save":
            coord.save(1, [StateComponent("model", {"w": t}, SharingPattern.SHARDED)])
            return None
        coord.save(1, [StateComponent("model", {"w": torch.zeros(4, 2)}, SharingPattern.SHARDED)])
        try:
            coord.load([StateComponent("model", Box({"w": t}), SharingPattern.SHARDED)])
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "local": t.to_local().tolist()}
    return {"error": None}
