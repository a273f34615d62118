"""FSDPTrainer: fully sharded data parallelism (FSDP2's `fully_shard`) over the "dp" dimension of the mesh,
optionally over a tensor-parallel model (tp > 1: `parallelize_module` over "tp" first, by `tp_plan`).

Every block (each element of the model's `nn.ModuleList`s, a transformer's layers) is wrapped with
`fully_shard`, then the root (which takes the remaining parameters): each rank keeps 1/dp of every parameter
(of its tensor-parallel shard), gradient and AdamW moment, and FSDP2 gathers and reduce-scatters around each
block. Model and optimizer are SharingPattern.SHARDED: each rank writes its own shards (tensor-parallel ones
carry FSDP2's strided placement, one box per rank), and a load at another dp or tp reads only the byte ranges
its new shards need. With tp > 1 the parameters only FSDP2 shards are presented over the whole mesh
(`mesh_state.OnWholeMesh`), so the tp ranks holding the same shard are checked to agree. The optimizer is
saved keyed by parameter name (torch.distributed.checkpoint.state_dict), so its state does not depend on
parameter order. Data: one sampler per replica (PER_GROUP over "tp", a group of one rank when tp=1);
scheduler, trainer state and data progress REPLICATED; RNG PER_RANK. At another layout RNG and data follow
`ParallelConfig.on_layout_change` (RESEED rebuilds them), as for the other mesh trainers."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

from ckpt import SharingPattern, StateComponent

from .base import StepOutput
from .gradients import clip_by_global_norm, clip_on_mesh
from .hybrid import tensor_parallel
from .keys import DATA, MODEL, OPTIMIZER
from .mesh_state import OnWholeMesh, OptimizerByName
from .parallel_base import ParallelTrainer


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the model: the elements of its `nn.ModuleList`s (a transformer's layers), each one FSDP2
    unit; everything else (embeddings, a head tied to them, final norms) belongs to the root's unit, so weights
    used outside their own module's forward (a tied head) are gathered when they are used."""
    return [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]


class FSDPTrainer(ParallelTrainer):
    """FSDP2 training over "dp" (ParallelConfig(dp=N)), optionally with tensor parallelism inside each replica
    (ParallelConfig(dp=N, tp=M, tp_plan=...)); construct it on every rank."""

    inner_dim = "tp"

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.inner_size > 1:  # tensor parallel inside each replica first; FSDP2 then shards over "dp"
            model = tensor_parallel(model, self.mesh["tp"], self.parallel.tp_plan)
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
        if self.inner_size > 1:
            return clip_on_mesh(self.unwrapped_model.parameters(), max_norm, self.mesh)
        return clip_by_global_norm(self.unwrapped_model.parameters(), max_norm, shard_group=self.dp_group,
                                   shard_count=self.dp_size)

    def _eval_batch(self, batch: Any) -> tuple[float, int]:
        loss = float(self.compute_loss(self.model, batch))  # every tp rank runs the forward; one counts it
        n = self._samples(batch)
        return (loss * n, n) if self.inner_rank == 0 else (0.0, 0)

    def training_step(self, batch: Any) -> StepOutput:
        """Forward and backward (gradients averaged by FSDP2), clipped by the whole model's norm; with a
        recovery policy every rank agrees whether to apply the optimizer step."""
        loss = self._forward_backward(batch)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        grad_norm = self._clip(max_norm)
        return self.end_step(loss, grad_norm)

    def get_state_components(self) -> list[StateComponent]:
        sharded, model = SharingPattern.SHARDED, self.unwrapped_model
        optimizer: Any = OptimizerByName(self.optimizer, model)
        if self.inner_size > 1:  # the parameters tensor parallelism leaves alone are on "dp" only: lift them
            model, optimizer = OnWholeMesh(model, self.mesh), OnWholeMesh(optimizer, self.mesh)
        return [StateComponent(MODEL, model, sharded), StateComponent(OPTIMIZER, optimizer, sharded),
                StateComponent(DATA, self.train_loader, SharingPattern.PER_GROUP, process_group_name=self.inner_dim),
                *self._shared_components()]


__all__ = ["FSDPTrainer", "OptimizerByName", "blocks"]
