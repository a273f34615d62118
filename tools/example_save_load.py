"""Save and load every sharing pattern under torchrun, then check the restored state bit for bit.

    torchrun --standalone --nproc-per-node 4 tools/example_save_load.py --run-dir runs/example

Works with any number of processes (PER_GROUP pairs up ranks when the world size is even), and with
plain `python tools/example_save_load.py` as a world of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import torch
import torch.distributed as dist

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel


class Holder:
    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/example", help="folder for the checkpoints")
    parser.add_argument("--steps", type=int, default=3, help="how many checkpoints to save")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    pairs = [dist.new_group(list(range(r, min(r + 2, world)))) for r in range(0, world, 2)] if world > 1 else [None]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW(model.parameters())
    random.seed(rank)
    coord = CheckpointCoordinator(args.run_dir, process_groups={"pair": pairs[rank // 2]})
    comps = [
        StateComponent("model", model, SharingPattern.REPLICATED, validation_level=ValidationLevel.TENSOR),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("rng", Holder({"python": random.getstate(), "torch": torch.get_rng_state()}),
                       SharingPattern.PER_RANK),
        StateComponent("progress", Holder({"samples_seen": 0}), SharingPattern.GLOBAL),
        StateComponent("pair_state", Holder({"pair": torch.tensor([rank // 2])}), SharingPattern.PER_GROUP,
                       process_group_name="pair"),
        StateComponent("node_cache", Holder({"node": torch.tensor([rank // int(os.environ.get("LOCAL_WORLD_SIZE", 1))])}),
                       SharingPattern.PER_NODE, required=False),
    ]
    start = coord.latest().step if coord.latest() else 0
    for step in range(start + 1, start + args.steps + 1):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        comps[3].stateful.state = {"samples_seen": step * 8 * world}
        coord.save(step, comps, metrics={"loss": loss.item()})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = coord.load(comps)
    same = all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    if rank == 0:
        print(f"world size {world}: saved steps {start + 1}..{start + args.steps} in {args.run_dir}; "
              f"loaded step {result.step} ({', '.join(result.loaded)}); model restored bit for bit: {same}")
    if not same:
        raise SystemExit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
