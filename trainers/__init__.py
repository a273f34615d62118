"""trainers: training loops that checkpoint through ckpt (Simple, DDP, FSDP, Pipeline, Hybrid, Accelerate), with
stateful callbacks."""

from __future__ import annotations

from .accel import AccelTrainer
from .arguments import TrainingArguments
from .base import StepOutput, Trainer, TrainingError
from .callbacks import TrainerCallback, TrainerControl
from .data import EpochSampler, StatefulDataLoader
from .ddp import DDPTrainer, init_distributed
from .fsdp import FSDPTrainer
from .hooks import StepHook
from .hybrid import HybridTrainer
from .parallel_config import LayoutChange, ParallelConfig, PipelineConfig
from .pipeline import PipelineTrainer
from .rng import RNGState, set_seed
from .simple import SimpleTrainer
from .state import TrainerState

__all__ = [
    "AccelTrainer",
    "DDPTrainer",
    "EpochSampler",
    "FSDPTrainer",
    "HybridTrainer",
    "LayoutChange",
    "ParallelConfig",
    "PipelineConfig",
    "PipelineTrainer",
    "RNGState",
    "SimpleTrainer",
    "StatefulDataLoader",
    "StepHook",
    "StepOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "TrainingError",
    "init_distributed",
    "set_seed",
]
