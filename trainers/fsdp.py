"""FSDPTrainer: fully sharded data parallelism (FSDP2's `fully_shard`) over the "dp" dimension of the mesh.

Every block (each element of the model's `nn.ModuleList`s, a transformer's layers) is wrapped with
`fully_shard`, then the root (which takes the remaining parameters): each rank keeps 1/dp of every parameter, gradient and AdamW moment, and FSDP2
gathers and reduce-scatters around each block. Model and optimizer are SharingPattern.SHARDED: each rank
writes its own shards, and a load at another world size reads only the byte ranges its new shards need.
The optimizer is saved keyed by parameter name (torch.distributed.checkpoint.state_dict), so its state does
not depend on parameter order. Data: one sampler per replica (PER_GROUP over "tp", a group of one rank when
tp=1); scheduler, trainer state and data progress REPLICATED; RNG PER_RANK. At another world size RNG and data
follow `ParallelConfig.on_layout_change` (RESEED rebuilds them), as for the other mesh trainers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

from ckpt import SharingPattern, StateComponent

from .base import StepOutput
from .gradients import clip_by_global_norm
from .keys import DATA, MODEL, OPTIMIZER
from .mesh_state import OptimizerByName
from .parallel_base import ParallelTrainer


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the model: the elements of its `nn.ModuleList`s (a transformer's layers), each one FSDP2
    unit; everything else (embeddings, a head tied to them, final norms) belongs to the root's unit, so weights
    used outside their own module's forward (a tied head) are gathered when they are used."""
    return [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]


class FSDPTrainer(ParallelTrainer):
    """FSDP2 training over "dp" (ParallelConfig(dp=N)); construct it on every rank."""

    inner_dim = "tp"

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.inner_size > 1:
            raise ValueError(f"FSDPTrainer: tp={self.inner_size} is not supported yet (FSDP2 over a tensor-parallel "
                             "model shards some parameters with strided placements ckpt does not save); use "
                             "ParallelConfig(dp=N), or HybridTrainer for dp x tp")
        dp_mesh = self.mesh["dp"]
        for block in blocks(model):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model

    def _forward_backward(self, batch: Any) -> float:
        loss = self.compute_loss(self.model, batch)
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients over "dp"
        return float(loss.detach())

    def _clip(self, max_norm: float) -> float:
        return clip_by_global_norm(self.unwrapped_model.parameters(), max_norm, shard_group=self.dp_group,
                                   shard_count=self.dp_size)

    def _eval_batch(self, batch: Any) -> tuple[float, int]:
        n = self._samples(batch)
        return float(self.compute_loss(self.model, batch)) * n, n

    def training_step(self, batch: Any) -> StepOutput:
        """Forward and backward (gradients averaged by FSDP2), clipped by the whole model's norm; with a
        recovery policy every rank agrees whether to apply the optimizer step."""
        loss = self._forward_backward(batch)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        grad_norm = self._clip(max_norm)
        return self.end_step(loss, grad_norm)

    def get_state_components(self) -> list[StateComponent]:
        sharded = SharingPattern.SHARDED
        return [StateComponent(MODEL, self.unwrapped_model, sharded),
                StateComponent(OPTIMIZER, OptimizerByName(self.optimizer, self.unwrapped_model), sharded),
                StateComponent(DATA, self.train_loader, SharingPattern.PER_GROUP, process_group_name=self.inner_dim),
                *self._shared_components()]


__all__ = ["FSDPTrainer", "OptimizerByName", "blocks"]
