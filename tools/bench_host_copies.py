"""What an in-memory rollback copy costs per save and rank: a fresh host copy (after a sync save) against keeping
the copy an async save already staged (CheckpointCoordinator.take_staged_state), and a restore from it.

    python tools/bench_host_copies.py                 # the demo's model and a 6-layer, 384-wide one
    python tools/bench_host_copies.py --repeats 10

One process, one thread; the model and AdamW state of the demo's TinyGPT. docs/recovery.md quotes the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from trainers.demo.model import GPTConfig, TinyGPT
from trainers.recovery.memory import HostCopies, restore

SIZES = ((3, 96, 4), (6, 384, 6))  # (n_layer, d_model, n_head): the demo's model, and the larger one of the docs


def _trained(n_layer: int, d_model: int, n_head: int) -> list[StateComponent]:
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head))
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 256, (2, 16))
    model(ids, ids).backward()
    opt.step()  # AdamW's state exists from the first step
    return [StateComponent("model", model, SharingPattern.REPLICATED),
            StateComponent("optimizer", opt, SharingPattern.REPLICATED)]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(components: list[StateComponent], repeats: int) -> dict[str, float]:
    """Median seconds of: a fresh copy, keeping the staged copy, and a restore (one save per repeat)."""
    fresh, staged, back = [], [], []
    copies = HostCopies(1 << 40, rank=0)
    with tempfile.TemporaryDirectory() as run:
        coord = CheckpointCoordinator(run, async_save=True)
        for step in range(1, repeats + 1):
            coord.save(step, components)
            fresh.append(_timed(lambda s=step: copies.keep(s, "fresh", components, {}, None)))
            copies.forget_after(0)
            taken = coord.take_staged_state()
            staged.append(_timed(lambda s=step, t=taken: copies.keep(s, "staged", components, {}, None, staged=t)))
            back.append(_timed(lambda s=step: restore(copies.get(s), components)))
            copies.forget_after(0)  # gives the staged buffers back: the next save stages into them
        coord.wait()
        coord.close()
    nbytes = sum(t.numel() * t.element_size() for c in components for t in _tensors(c.state_dict()))
    return {"state_mib": nbytes / 2**20, "fresh_copy_s": statistics.median(fresh),
            "keep_staged_s": statistics.median(staged), "restore_s": statistics.median(back)}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=6, help="saves per model (default 6); medians are printed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for n_layer, d_model, n_head in SIZES:
        r = measure(_trained(n_layer, d_model, n_head), args.repeats)
        print(f"n_layer={n_layer} d_model={d_model}: model + AdamW state {r['state_mib']:.1f} MiB; keep a fresh copy "
              f"{r['fresh_copy_s'] * 1e3:.2f} ms, keep the async save's staged copy {r['keep_staged_s'] * 1e3:.2f} ms, "
              f"restore {r['restore_s'] * 1e3:.2f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
