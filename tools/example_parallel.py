"""Train a tiny regression model with one of the model-parallel trainers; run under torchrun (see
docs/parallelism.md). A second launch with --resume continues from the newest checkpoint, at the same or
another layout (--on-layout-change reseed).

  torchrun --standalone --nproc-per-node 4 tools/example_parallel.py --trainer tp --dp 2 --tp 2 --run-dir runs/tp
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainers import (
    AccelTrainer,
    HybridTrainer,
    LayoutChange,
    ParallelConfig,
    PipelineConfig,
    PipelineTrainer,
    TrainingArguments,
)


class Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, dim: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class MLP(torch.nn.Module):
    """For tensor parallelism: forward returns the loss."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.net(x), y)


def stages() -> torch.nn.Sequential:
    """For pipelines: four linear layers, cut into 1, 2 or 4 stages."""
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["pipeline", "tp", "pp", "accel"], required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--on-layout-change", choices=[c.value for c in LayoutChange], default="error")
    a = p.parse_args()
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=a.run_dir, max_steps=a.steps, per_device_train_batch_size=8, save_steps=4,
                             logging_steps=2, resume_from_checkpoint="latest" if a.resume else None)
    torch.manual_seed(0)
    common = {"train_dataset": Regression()}
    mse = torch.nn.functional.mse_loss
    policy = LayoutChange(a.on_layout_change)
    pipeline = PipelineConfig(schedule=a.schedule, n_microbatches=a.microbatches, on_layout_change=policy)
    if a.trainer == "pipeline":
        trainer = PipelineTrainer(stages(), args, output_loss=mse, pipeline=pipeline, **common)
    elif a.trainer == "tp":
        parallel = ParallelConfig(dp=a.dp, tp=a.tp, tp_plan={"net.0": "colwise", "net.2": "rowwise"},
                                  on_layout_change=policy)
        trainer = HybridTrainer(MLP(), args, parallel=parallel, **common)
    elif a.trainer == "pp":
        parallel = ParallelConfig(dp=a.dp, pp=a.pp, pipeline=pipeline, on_layout_change=policy)
        trainer = HybridTrainer(stages(), args, parallel=parallel, output_loss=mse, **common)
    else:
        trainer = AccelTrainer(MLP(), args, **common)
    state = trainer.train()
    if trainer.rank == 0:
        print(f"{a.trainer}: world size {trainer.world_size}, step {state.global_step}, "
              f"loss {state.log_history[-1].get('loss', float('nan')):.4f}, checkpoints "
              f"{[r.step for r in trainer.coordinator.checkpoints()]}")
    trainer.coordinator.close()


if __name__ == "__main__":
    main()
