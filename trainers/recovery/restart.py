"""Joining a job that torchrun may restart (`--max-restarts`).

torchrun's agent hosts the rendezvous store and keeps it across restarts without separating the attempts'
keys, so a restarted rank can read a dead rank's address from the previous attempt and fail to connect
("Gloo connectFullMesh failed ... Connection refused"). Initialising with this attempt's keys under their
own prefix avoids that.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

STORE_TIMEOUT = timedelta(minutes=30)


def init_process_group_for_restarts(backend: str | None = None) -> None:
    """Initialise torch.distributed from torchrun's environment, this attempt's keys apart from earlier ones."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        dist.init_process_group(backend)  # not under torchrun's agent store: nothing is kept across attempts
        return
    world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=STORE_TIMEOUT)
    prefixed = dist.PrefixStore(f"attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world)
