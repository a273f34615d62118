"""Workers for the SHARDED tests: one small model laid out plainly, with FSDP2, or over a 2-D mesh, saved and
loaded through ckpt, with the full values of its weights and optimizer state returned for comparison."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support.workers import Box  # plain values next to the DTensors
from trainers.fsdp import OptimizerByName

# Uneven on purpose: 7 and 3 rows do not split evenly over 2 or 4 ranks.
SIZES = (5, 7, 3)


def build(layout: str, seed: int) -> torch.nn.Module:
    """The model with the weights of `seed`, laid out as `layout` (plain, fsdp, or 2d: dp x tp over 4 ranks)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.ReLU(),
                                torch.nn.Linear(SIZES[1], SIZES[2]))
    if layout == "fsdp":
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    elif layout == "2d":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        placements = {"0.weight": [Replicate(), Shard(0)], "0.bias": [Replicate(), Shard(0)],
                      "2.weight": [Shard(0), Shard(1)], "2.bias": [Replicate(), Replicate()]}
        for name, p in list(model.named_parameters()):
            layer, attr = name.split(".")
            setattr(model[int(layer)], attr, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, placements[name])))
    return model


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One AdamW step on the same batch on every rank (so FSDP's averaged gradients equal one rank's)."""
    torch.manual_seed(seed)
    model(torch.randn(4, SIZES[0])).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def full(t: Any) -> np.ndarray:
    """The whole value as a NumPy array (what crosses back to the test process)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().numpy().copy()


def full_values(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every weight and optimizer state tensor whole, by parameter name."""
    out = {name: full(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters() if opt is not None else ():
        for k, v in opt.state.get(p, {}).items():
            out[f"{name}/{k}"] = full(v)
    return out


def components(model: torch.nn.Module, opt: torch.optim.Optimizer | None, form: str, extra: Box
               ) -> list[StateComponent]:
    comps = [StateComponent("model", model, SharingPattern.SHARDED),
             StateComponent("extra", extra, SharingPattern.SHARDED)]
    if opt is not None:
        comps.append(StateComponent("optim", OptimizerByName(opt, model) if form == "fqn" else opt, SharingPattern.SHARDED))
    return comps


def save_worker(rank: int, world: int, run_dir: str, layout: str, form: str, async_save: bool = False
                ) -> dict[str, Any]:
    """Train one step under `layout`, save at step 1 (in the background with `async_save`, the weights then
    changed by another step while it writes), and return the full values saved."""
    model = build(layout, seed=0)
    opt = None if layout == "2d" else torch.optim.AdamW(model.parameters(), lr=0.1)
    if opt is not None:
        train_step(model, opt, seed=1)
    extra = Box({"epoch": 3, "table": torch.arange(6.0), "name": "run"})
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, components(model, opt, form, extra), async_save=async_save)
        saved = full_values(model, opt)
        if async_save and opt is not None:
            train_step(model, opt, seed=2)  # the staged copies, not the live tensors, are written
        coord.wait()
    return saved


def load_worker(rank: int, world: int, run_dir: str, layout: str, form: str, optim: bool = True) -> dict[str, Any]:
    """Build other weights under `layout`, load the checkpoint (with the optimizer when `optim`), and return
    the full values."""
    model = build(layout, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1) if optim else None
    if opt is not None and form == "index":
        train_step(model, opt, seed=9)  # FSDP2's own optimizer state dict has no entries before a first step
    extra = Box({})
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.load(components(model, opt, form, extra), strict=optim)
    out = full_values(model, opt)
    out["extra"] = {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in extra.state.items()}
    out["world"] = dist.get_world_size()
    return out


def refuse_worker(rank: int, world: int, run_dir: str) -> None:
    """An FSDP2 model declared REPLICATED: refused before anything is written."""
    model = build("fsdp", seed=0)
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED)])


def killed_worker(rank: int, world: int, run_dir: str, fault: Any) -> None:
    """Save step 10 of an FSDP2 model, then step 20 with `fault` injected (one rank dies in it)."""
    from ckpt.testing import FaultyStorage

    model = build("fsdp", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=30, storage=storage)
    coord.save(10, [StateComponent("model", model, SharingPattern.SHARDED)])
    train_step(model, opt, seed=1)
    storage.inject(fault)
    coord.save(20, [StateComponent("model", model, SharingPattern.SHARDED)])


def drifted_2d_worker(rank: int, world: int, run_dir: str) -> None:
    """A 2-D model whose replicated shard (0.weight is Replicate() over dp) drifts on rank 2."""
    model = build("2d", seed=0)
    if rank == 2:
        with torch.no_grad():
            model[0].weight.to_local()[0, 0] += 1e-3
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, [StateComponent("model", model, SharingPattern.SHARDED)])
