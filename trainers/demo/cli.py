"""The demo job's command line: build the model, data and trainer from flags, train, then report.

Under torchrun it trains with DDPTrainer (gloo on CPU by default; `--device cuda`: nccl, one GPU per local rank);
as a plain `python -m trainers.demo` it uses SimpleTrainer. The run ends by printing the best checkpoints, the `ckpt ls` view of the run dir, the path of
its `ckpt report` page (RUN_DIR/report.html), and a digest of the final parameters (equal digests mean bit-identical parameters, e.g. after a resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ckpt import CheckpointError
from trainers import (
    DDPTrainer,
    FSDPTrainer,
    LayoutChange,
    ParallelConfig,
    SimpleTrainer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    TrainingError,
)
from trainers.ddp import cuda_device_for_local_rank
from trainers.recovery import init_process_group_for_restarts
from trainers.recovery.policy import load_recovery_policy

from .faults import add_recovery_flags, recovery_callbacks, recovery_option, recovery_report
from .model import GPTConfig, TinyGPT
from .text import CORPUS, ByteWindows, read_corpus, split

log = logging.getLogger("trainers.demo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainers.demo",
        description="Train a small byte-level GPT on the bundled corpus with checkpoints and best-N retention. "
                    "Run it under `torchrun --standalone --nproc-per-node N -m trainers.demo` for DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--run-dir", default="runs/demo", help="where checkpoints and metrics.jsonl go")
    run.add_argument("--max-steps", type=int, default=800, help="optimizer steps in total")
    run.add_argument("--eval-steps", type=int, default=100, help="evaluate every N steps")
    run.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (with an evaluation)")
    run.add_argument("--logging-steps", type=int, default=50, help="one log line every N steps")
    run.add_argument("--seed", type=int, default=0, help="seeds the weights, dropout and data order")
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --run-dir (a fresh start if there is none)")
    run.add_argument("--stop-at-step", type=int, default=None, metavar="K",
                     help="stop after step K with a checkpoint, as an interrupted job would; finish with --resume")
    run.add_argument("--save-total-limit", type=int, default=2, help="keep the newest N checkpoints ...")
    run.add_argument("--preserve-n-best", type=int, default=2, help="... plus the N best by eval_loss")
    run.add_argument("--trainer", choices=("ddp", "fsdp"), default="ddp",
                     help="under torchrun: ddp (DistributedDataParallel, state REPLICATED) or fsdp (FSDP2's fully_shard "
                          "per block, model and optimizer SHARDED: each rank saves and loads only its shards); "
                          "without torchrun the demo runs one process (SimpleTrainer)")
    run.add_argument("--dispatch-batches", action="store_true",
                     help="rank 0 draws each global batch and scatters slices (default: a sampler per rank)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="cpu: train on the CPU, ranks joined by gloo; cuda: rank r on cuda:LOCAL_RANK, joined by nccl")
    run.add_argument("--debug", action="store_true", help="on an error, show the traceback (default: one line)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per rank (default: CPU cores / ranks on this node, at least 1)")
    model = p.add_argument_group("model and data")
    model.add_argument("--n-layer", type=int, default=3, help="transformer blocks")
    model.add_argument("--n-head", type=int, default=4, help="attention heads per block")
    model.add_argument("--d-model", type=int, default=96, help="width (a multiple of --n-head)")
    model.add_argument("--block-size", type=int, default=64, help="bytes of context per sample")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout probability")
    model.add_argument("--batch-size", type=int, default=8, help="samples per rank per step")
    model.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    model.add_argument("--warmup-steps", type=int, default=40, help="linear warm-up, then cosine decay to 10%%")
    model.add_argument("--eval-windows", type=int, default=96, help="held-out windows per evaluation")
    model.add_argument("--corpus", default=CORPUS, help="a text file to train on (bytes)")
    model.add_argument("--sample-bytes", type=int, default=160, help="bytes of text to sample at the end (0: none)")
    add_recovery_flags(p)
    return p.parse_args(argv)


def cosine_with_warmup(warmup: int, total: int):
    """LR scheduler factory: linear warm-up over `warmup` steps, then cosine decay to 10% at `total`."""

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        def scale(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)

    return factory


class StopAtStep(TrainerCallback):
    """Ends training after a given step (the end-of-training checkpoint is still written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def parameter_digest(model: torch.nn.Module) -> str:
    """xxh3-128 over every parameter and buffer's name, dtype, shape and bytes, in state_dict order."""
    h = xxhash.xxh3_128()
    for name, t in model.state_dict().items():
        t = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def device_setup(opts: argparse.Namespace) -> tuple[str, str]:
    """(torch.distributed backend, device) for --device: gloo and the CPU, or nccl and cuda:LOCAL_RANK."""
    if opts.device == "cpu":
        return "gloo", "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device; use --device cpu")
    return "nccl", f"cuda:{cuda_device_for_local_rank(int(os.environ.get('RANK', 0)))}"


def _recovery_for(opts: argparse.Namespace) -> Any:
    """The recovery policy; with --trainer fsdp without out-of-memory retry (FSDP2's forward gathers weights
    from the other ranks, so one rank cannot retry a step alone)."""
    option = recovery_option(opts)
    if opts.trainer != "fsdp" or option is None:
        return option
    policy = load_recovery_policy(option)
    return dataclasses.replace(policy, oom_retry=False) if policy is not None else None


def build_trainer(opts: argparse.Namespace, distributed: bool) -> Trainer:
    backend, device = device_setup(opts)
    train_data, eval_data = split(read_corpus(opts.corpus))
    cfg = GPTConfig(n_layer=opts.n_layer, n_head=opts.n_head, d_model=opts.d_model, block_size=opts.block_size,
                    dropout=opts.dropout)
    args = TrainingArguments(
        output_dir=opts.run_dir, max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=16, logging_steps=opts.logging_steps, eval_steps=opts.eval_steps,
        save_steps=opts.save_steps, eval_on_save=True, save_total_limit=opts.save_total_limit,
        preserve_best_model=opts.preserve_n_best > 0, preserve_n_best=max(1, opts.preserve_n_best),
        best_model_metric="loss", resume_from_checkpoint="latest" if opts.resume else None, seed=opts.seed,
        dispatch_batches=opts.dispatch_batches, full_determinism=True, max_grad_norm=1.0,
        recovery=_recovery_for(opts), step_timeout_s=opts.step_timeout, device=device, ddp_backend=backend)
    torch.manual_seed(opts.seed)  # the initial weights (the same on every rank; DDP checks it)
    model = TinyGPT(cfg)
    callbacks = [StopAtStep(opts.stop_at_step)] if opts.stop_at_step else []
    callbacks += recovery_callbacks(opts)
    common = {"train_dataset": ByteWindows(train_data, cfg.block_size),
              "eval_dataset": ByteWindows(eval_data, cfg.block_size, limit=opts.eval_windows),
              "optimizer_factory": lambda params: torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95),
                                                                     weight_decay=0.01),
              "lr_scheduler_factory": cosine_with_warmup(opts.warmup_steps, opts.max_steps), "callbacks": callbacks}
    if opts.trainer == "fsdp":
        if not distributed:
            raise ValueError("--trainer fsdp shards the model over ranks: launch it with torchrun "
                             "(torchrun --standalone --nproc-per-node N -m trainers.demo --trainer fsdp)")
        if opts.dispatch_batches:
            raise ValueError("--trainer fsdp keeps a sampler per rank; leave out --dispatch-batches")
        world = int(os.environ["WORLD_SIZE"])
        return FSDPTrainer(model, args, parallel=ParallelConfig(dp=world, on_layout_change=LayoutChange.RESEED),
                           **common)
    cls = DDPTrainer if distributed else SimpleTrainer
    return cls(model, args, **common)


def final_words(trainer: Trainer, opts: argparse.Namespace) -> tuple[str, str | None]:
    """The final parameters' digest and a sample of generated text, computed on every rank (an FSDP2 model
    gathers its weights in both, a collective)."""
    model = trainer.unwrapped_model
    digest = parameter_digest(model)
    if opts.sample_bytes <= 0:
        return digest, None
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.tensor(list(b"Day 7. "), dtype=torch.int64, device=device)
    sharded = isinstance(model, FSDPModule)
    if sharded:  # generate() calls logits(), not forward(): gather the root's own weights by hand
        model.unshard()
    text = model.generate(prompt, opts.sample_bytes, generator=torch.Generator(device=device).manual_seed(0))
    if sharded:
        model.reshard()
    return digest, bytes(text.tolist()).decode("ascii", errors="replace")


def report(trainer: Trainer, opts: argparse.Namespace, final: tuple[str, str | None]) -> None:
    """Rank 0: the best checkpoints (the coordinator's summary), the `ckpt ls` view of the run dir, the final
    parameters' digest and a sample of generated text."""
    coord = trainer.coordinator
    out = sys.stdout
    out.write("\n" + coord.summary() + "\n")
    out.write(f"$ ckpt ls {opts.run_dir}\n")
    out.flush()
    # The `ckpt` console command's entry point (pyproject: ckpt = "ckpt.cli:main"), as a user would run it.
    from ckpt.cli import main as ckpt_main

    ckpt_main(["ls", opts.run_dir])
    out.write(recovery_report(opts.run_dir))
    out.flush()
    ckpt_main(["report", opts.run_dir])  # the run as one HTML page: loss, checkpoints, recovery events
    digest, sample = final
    out.write(f"\nfinal parameters at step {trainer.state.global_step}: xxh3-128 {digest}\n")
    if sample is not None:
        out.write("sample: " + sample + "\n")
    out.flush()


def speaks_for_the_job(exc: CheckpointError, rank: int, world_size: int) -> bool:
    """Whether this rank prints the job's checkpoint error: rank 0, or, when rank 0 is one of the ranks that
    failed (dead, hung), the lowest rank that did not, so the error is said once and never by nobody."""
    failed = set(exc.failures) | set(getattr(exc, "missing_ranks", None) or ())
    alive = [r for r in range(world_size) if r not in failed]
    return rank == (alive[0] if alive else 0)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // local_world))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if distributed:  # before the trainer does it: a torchrun restart must not see the last attempt's keys
            init_process_group_for_restarts(device_setup(opts)[0])
        trainer = build_trainer(opts, distributed)
        trainer.train()
        final = final_words(trainer, opts)
        if trainer.rank == 0:
            report(trainer, opts, final)
    except ValueError as exc:  # options and state the user can fix; the message says how
        if rank == 0:
            sys.stderr.write(f"trainers.demo: error: {exc}\n")
        return 2
    except TrainingError as exc:  # recovery gave up, or a step failed on some rank; the message says which
        if rank == 0:
            sys.stderr.write(f"trainers.demo: training failed: {exc}\n")
            sys.stderr.write(recovery_report(opts.run_dir))
        return 1
    except CheckpointError as exc:  # raised on every rank: say it once, on one line
        if opts.debug:
            raise
        if speaks_for_the_job(exc, rank, int(os.environ.get("WORLD_SIZE", 1))):
            sys.stderr.write(f"trainers.demo: checkpoint error: {type(exc).__name__}: {' '.join(str(exc).split())}\n"
                             "(pass --debug for the traceback)\n")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
