"""Pipeline pieces shared by PipelineTrainer and HybridTrainer (dp x pp): cutting an nn.Sequential into
stages that keep the model's parameter names, running a training step through a torch.distributed.pipelining
schedule, and a forward-only pass for evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from .parallel_config import PipelineConfig

OutputLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)


def stage_names(model: torch.nn.Module, num_stages: int, split_points: tuple[str, ...] | None) -> list[list[str]]:
    """The top-level child names of each stage, in order."""
    if not isinstance(model, torch.nn.Sequential):
        raise TypeError(f"pipeline parallelism cuts an nn.Sequential into stages; got {type(model).__name__}. Wrap "
                        "the model's layers in an nn.Sequential whose last child returns the output")
    names = [n for n, _ in model.named_children()]
    if split_points is None:
        # Stages start at children with parameters (so every stage has some to train), spread evenly over them;
        # a child without parameters (an activation, dropout) stays with the layer before it.
        starts = [i for i, (_, child) in enumerate(model.named_children()) if any(True for _ in child.parameters())]
        if len(starts) < num_stages:
            raise ValueError(f"the model has {len(starts)} top-level children with parameters, too few for "
                             f"{num_stages} stages; pass PipelineConfig.split_points, or use fewer stages")
        per, extra = divmod(len(starts), num_stages)
        firsts = [0]
        for s in range(num_stages - 1):
            firsts.append(firsts[-1] + per + (1 if s < extra else 0))
        bounds = [0, *[starts[i] for i in firsts[1:]], len(names)]
    else:
        unknown = [p for p in split_points if p not in names]
        if unknown or len(split_points) != num_stages - 1:
            raise ValueError(f"PipelineConfig.split_points={split_points}: need {num_stages - 1} names of children "
                             f"of the model ({names}); unknown: {unknown}")
        bounds = [0, *[names.index(p) for p in split_points], len(names)]
        if bounds != sorted(set(bounds)):
            raise ValueError(f"PipelineConfig.split_points={split_points} must be in model order, each stage non-empty")
    return [names[bounds[s]:bounds[s + 1]] for s in range(num_stages)]


def stage_module(model: torch.nn.Sequential, names: list[str]) -> torch.nn.Sequential:
    """The children `names` of `model` as their own nn.Sequential, keeping their names (`3.weight` stays)."""
    children = dict(model.named_children())
    return torch.nn.Sequential(OrderedDict((n, children[n]) for n in names))


class PipelineRunner:
    """One stage of a pipeline over `group` (the ranks of one replica, in stage order)."""

    def __init__(self, module: torch.nn.Module, stage: int, num_stages: int, group: Any, config: PipelineConfig,
                 output_loss: OutputLoss, device: torch.device):
        self.module, self.stage, self.num_stages, self.group = module, stage, num_stages, group
        self.output_loss = output_loss
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        pipe_stage = PipelineStage(module, stage, num_stages, device, group=group)
        cls = Schedule1F1B if config.schedule == "1f1b" else ScheduleGPipe
        self.schedule = cls(pipe_stage, n_microbatches=config.n_microbatches, loss_fn=output_loss)

    def train_step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        """Forward and backward over the micro-batches (gradients accumulate in the stage); returns the batch's
        loss (mean of the micro-batch losses) on every stage."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        kwargs = {"target": target, "losses": losses} if self.is_last else {}
        self.schedule.step(*args, **kwargs)
        mine = torch.stack([loss.detach() for loss in losses]).mean() if self.is_last else torch.zeros(())
        return float(self.from_last(mine.to(torch.float64)))

    def from_last(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's `value` on every stage (others pass zeros of the same shape)."""
        if self.num_stages == 1:
            return value
        out = value.clone() if self.is_last else torch.zeros_like(value)
        dist.all_reduce(out, group=self.group)
        return out

    def eval_batch(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
        """A forward-only pass of the whole batch, stage to stage; (loss x samples, samples) on the last stage,
        (0, 0) elsewhere. Point to point, so any batch size works (the schedule fixes shapes at its first step)."""
        x = inputs if self.is_first else self._recv()
        out = self.module(x)
        if not self.is_last:
            self._send(out)
            return 0.0, 0
        n = int(target.shape[0]) if target.dim() > 0 else 1
        return float(self.output_loss(out, target)) * n, n

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def _send(self, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        header = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape, *([0] * (8 - t.dim()))], dtype=torch.int64)
        dist.send(header, dst=self._peer(self.stage + 1), group=self.group)
        dist.send(t, dst=self._peer(self.stage + 1), group=self.group)

    def _recv(self) -> torch.Tensor:
        header = torch.zeros(10, dtype=torch.int64)
        dist.recv(header, src=self._peer(self.stage - 1), group=self.group)
        ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
        t = torch.empty([int(s) for s in header[2:2 + ndim]], dtype=dtype)
        dist.recv(t, src=self._peer(self.stage - 1), group=self.group)
        return t
