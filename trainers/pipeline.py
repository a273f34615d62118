"""PipelineTrainer: one pipeline stage per rank, scheduled by torch.distributed.pipelining (GPipe or 1F1B).

Each stage's model and optimizer are its own (PER_RANK), saved under the model's fully qualified parameter
names, so a checkpoint of N stages loads into any number of stages (each finds its parameters by name in
every saved stage's files). Scheduler and trainer state are the same on every stage (REPLICATED). Every rank
follows the same sampler, so the data state is one global value (GLOBAL): the first stage feeds the inputs,
the last stage computes the loss against the targets. RNG is PER_RANK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ckpt import SharingPattern, StateComponent

from .ddp import init_distributed
from .gradients import clip_by_global_norm
from .keys import DATA, MODEL, OPTIMIZER
from .parallel_base import ParallelTrainer
from .parallel_config import ParallelConfig, PipelineConfig
from .pipeline_parts import PipelineRunner, stage_module, stage_names
from .sharded_state import ModuleState, OptimizerState


class PipelineMixin:
    """The pipeline half of a mesh trainer: stage building, the scheduled step, evaluation, clipping."""

    runner: PipelineRunner

    def _pipeline_config(self) -> PipelineConfig:
        return self.parallel.pipeline  # type: ignore[attr-defined]

    def _wrap_pipeline(self, model: torch.nn.Module) -> torch.nn.Module:
        t: Any = self
        if t.output_loss is None:
            raise TypeError(f"{type(self).__name__} with pipeline stages needs output_loss(output, target): the last "
                            "stage computes the loss from the model's output")
        config = self._pipeline_config()
        config.check_stages(t.inner_size, t.args.per_device_train_batch_size)
        names = stage_names(model, t.inner_size, config.split_points)[t.inner_rank]
        stage = stage_module(model, names)
        self.runner = PipelineRunner(stage, t.inner_rank, t.inner_size, t.inner_group, config, t.output_loss,
                                     t.device)
        return stage

    @property
    def _uses_batches(self) -> bool:
        t: Any = self
        return t.inner_rank == 0 or t.inner_rank == t.inner_size - 1

    def _pipeline_step(self, batch: Any) -> float:
        inputs, target = (batch[0], batch[1]) if batch is not None else (None, None)
        return self.runner.train_step(inputs, target)

    def _pipeline_clip(self, max_norm: float) -> float:
        t: Any = self
        return clip_by_global_norm(t.unwrapped_model.parameters(), max_norm, stage_group=t.inner_group,
                                   stage_count=t.inner_size)

    def _pipeline_eval(self, batch: Any) -> tuple[float, int]:
        return self.runner.eval_batch(batch[0], batch[1])


class PipelineTrainer(PipelineMixin, ParallelTrainer):
    """Pipeline-parallel training: the job's ranks are the stages of one pipeline; construct it on every rank.

    `model` is an nn.Sequential (cut into stages by `pipeline.split_points`, or evenly); batches are
    `(inputs, targets)`; `output_loss(output, target)` is the loss the last stage computes.
    """

    inner_dim = "pp"

    def __init__(self, model: torch.nn.Module, args: Any, *, output_loss: Callable[[torch.Tensor, torch.Tensor],
                 torch.Tensor], pipeline: PipelineConfig | None = None, **kwargs: Any):
        pipeline = pipeline or PipelineConfig()
        if not isinstance(pipeline, PipelineConfig):
            raise TypeError(f"pipeline must be a trainers.PipelineConfig, not {type(pipeline).__name__}")
        init_distributed(getattr(args, "ddp_backend", None) or "gloo")
        parallel = ParallelConfig(pp=dist.get_world_size(), pipeline=pipeline,
                                  on_layout_change=pipeline.on_layout_change)
        super().__init__(model, args, parallel=parallel, output_loss=output_loss, **kwargs)

    @property
    def needs_data(self) -> bool:
        return self._uses_batches

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._wrap_pipeline(model)

    def _forward_backward(self, batch: Any) -> float:
        return self._pipeline_step(batch)

    def _clip(self, max_norm: float) -> float:
        return self._pipeline_clip(max_norm)

    def _eval_batch(self, batch: Any) -> tuple[float, int]:
        return self._pipeline_eval(batch)

    def get_state_components(self) -> list[StateComponent]:
        per_rank = SharingPattern.PER_RANK
        return [StateComponent(MODEL, ModuleState(self.unwrapped_model), per_rank),
                StateComponent(OPTIMIZER, OptimizerState(self.optimizer, self.unwrapped_model), per_rank),
                StateComponent(DATA, self.train_loader, SharingPattern.GLOBAL),
                *self._shared_components()]
