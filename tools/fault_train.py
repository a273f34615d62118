"""A tiny deterministic training job that can kill one of its own ranks, to test auto-resume end to end.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 \\
        tools/fault_train.py --run-dir runs/fault --steps 30 --save-every 5 --kill-rank 1 --kill-step 13

Every step's batch is a function of the step and the rank, gradients are averaged with an all-reduce,
and a checkpoint (model, optimizer, progress, per-rank RNG) is saved every `--save-every` steps. At start
the job resumes from the latest committed checkpoint. On the first attempt only (torchrun's
TORCHELASTIC_RESTART_COUNT is 0), rank `--kill-rank` SIGKILLs itself at step `--kill-step`, either between
steps (`--kill-phase step`) or inside the save at or after that step, in the phase named (through
ckpt.testing.FaultyStorage). torchrun then restarts every rank, they resume, and the final parameters
(written by rank 0 to `--out`) must equal those of an uninterrupted run bit for bit.

Each attempt joins torch.distributed with its keys under a prefix of its own in torchrun's store: torchrun
keeps that store across restarts, and a restarted gloo rank could otherwise read a dead rank's address
from the previous attempt (pytorch/pytorch#135712). Setting TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the
launcher is the other way out.
"""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta

import safetensors.torch
import torch
import torch.distributed as dist

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent
from ckpt.testing import SIGKILL, Fault, FaultyStorage

# Where a save can be interrupted: the storage call each phase makes (see ckpt/testing.py).
SAVE_PHASES = {
    "write": Fault(op="write_file", match=".safetensors", error=SIGKILL),
    "barrier": Fault(op="fsync_dir", match=".partial/", error=SIGKILL),
    "manifest": Fault(op="write_file", match="manifest.json.tmp", error=SIGKILL),
    "rename": Fault(op="rename", match=".partial -> ", error=SIGKILL),
}


class Progress:
    """The next step to run (GLOBAL: one copy for the job)."""

    def __init__(self) -> None:
        self.next_step = 0

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])


class RNG:
    """This rank's torch generator (PER_RANK); the batches use it, so a resume must restore it."""

    def __init__(self, rank: int) -> None:
        self.gen = torch.Generator().manual_seed(1234 + rank)

    def state_dict(self) -> dict:
        return {"torch": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["torch"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--keep", type=int, default=2, help="save_total_limit of the retention policy")
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=None)
    p.add_argument("--kill-phase", choices=["step", *SAVE_PHASES], default="step")
    p.add_argument("--out", default=None, help="where rank 0 writes the final parameters (safetensors)")
    return p.parse_args()


def init_distributed(timeout: timedelta) -> None:
    """Join the job (gloo); under torchrun's agent store, this attempt's keys apart from earlier attempts'."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group("gloo", timeout=timeout)
        return
    world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    attempt = dist.PrefixStore(f"attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("gloo", store=attempt, rank=rank, world_size=world, timeout=timeout)


def main() -> None:
    args = parse_args()
    init_distributed(timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    doomed = attempt == 0 and rank == args.kill_rank and args.kill_step is not None

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress, rng = Progress(), RNG(rank)
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("optimizer", opt, SharingPattern.REPLICATED),
             StateComponent("progress", progress, SharingPattern.GLOBAL),
             StateComponent("rng", rng, SharingPattern.PER_RANK)]
    storage = FaultyStorage()
    with CheckpointCoordinator(args.run_dir, timeout=30, storage=storage,
                               retention=RetentionPolicy(save_total_limit=args.keep)) as coord:
        if coord.latest() is not None:
            result = coord.load(comps)
            if rank == 0:
                print(f"attempt {attempt}: resumed from step {result.step}", flush=True)
        elif rank == 0:
            print(f"attempt {attempt}: starting from scratch", flush=True)
        for step in range(progress.next_step, args.steps):
            if doomed and args.kill_phase == "step" and step == args.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            x = torch.randn(4, 8, generator=rng.gen)
            loss = (model(x).squeeze(-1) - x.sum(-1).sin()).pow(2).mean()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            opt.zero_grad()
            progress.next_step = step + 1
            if progress.next_step % args.save_every == 0:
                if doomed and args.kill_phase != "step" and step >= args.kill_step:
                    storage.inject(SAVE_PHASES[args.kill_phase])
                coord.save(progress.next_step, comps)
    if rank == 0:
        print(f"attempt {attempt}: finished {args.steps} steps", flush=True)
        if args.out:
            safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
