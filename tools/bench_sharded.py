"""SHARDED save/load of an FSDP2 model and its AdamW state against torch.distributed.checkpoint, and the bytes
each rank reads when the checkpoint moves to another world size.

    python tools/bench_sharded.py                     # ~1 GB of state (weights + AdamW moments), 2 ranks
    python tools/bench_sharded.py --size-mb 256 --repeats 1 --json

One run, side by side, on the same state: ckpt's save and load (SharingPattern.SHARDED, both components) and
dcp.save / dcp.load (with get/set_state_dict), each timed on every rank between barriers, median of
`--repeats`; each save goes to a fresh folder. Then the 2-rank checkpoint is loaded at 1 rank (a plain model)
and at 4 ranks (FSDP2) through a storage that counts the bytes read from tensor files, against the bytes of
each rank's target shards. That storage's files have no descriptor to map, so those loads read through it
range by range; a local load maps the files instead and touches the same byte ranges (each widened to whole
digest blocks of its piece, which is what a check of part of a piece costs). Byte counts are exact; timings
depend on the machine's load. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt import CheckpointCoordinator, LocalStorage, SharingPattern, StateComponent
from trainers.fsdp import OptimizerByName


class CountingStorage(LocalStorage):
    """The local filesystem, counting the bytes read from safetensors files."""

    def __init__(self) -> None:
        self.read = 0

    def open_read(self, path: str):
        f = super().open_read(path)
        if not path.endswith(".safetensors"):
            return f
        counter = self

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def seek(self, pos: int, whence: int = 0) -> int:
                return f.seek(pos, whence)

            def readinto(self, view) -> int:
                n = f.readinto(view)
                counter.read += n or 0
                return n

            def read(self, n: int = -1) -> bytes:
                data = f.read(n)
                counter.read += len(data)
                return data

            def close(self) -> None:
                f.close()

        return Counted()


def build(width: int, layers: int, sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=True) for _ in range(layers)])
    if sharded:
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()  # one step: the optimizer's moments exist
    opt.step()
    opt.zero_grad()
    return model, opt


def local_bytes(state: dict[str, Any]) -> int:
    """Bytes of this rank's own shards (a plain tensor counts whole)."""
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += local_bytes(v)
        elif isinstance(v, torch.Tensor):
            t = v.to_local() if isinstance(v, DTensor) else v
            total += t.numel() * t.element_size()
    return total


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    model, opt = build(args.width, args.layers, sharded=True)
    comps = [StateComponent("model", model, SharingPattern.SHARDED),
             StateComponent("optim", OptimizerByName(opt, model), SharingPattern.SHARDED)]
    state_bytes = [0]
    rank = dist.get_rank()
    state_bytes[0] = local_bytes({"m": model.state_dict(), "o": get_optimizer_state_dict(model, opt)})
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, state_bytes[0])
    times: dict[str, list[float]] = {"ckpt_save": [], "dcp_save": [], "ckpt_load": [], "dcp_load": []}
    for i in range(args.repeats):
        run_dir, dcp_dir = os.path.join(args.root, f"ckpt-{i}"), os.path.join(args.root, f"dcp-{i}")
        with CheckpointCoordinator(run_dir, timeout=600) as coord:
            times["ckpt_save"].append(timed(lambda: coord.save(1, comps)))
            times["ckpt_load"].append(timed(lambda: coord.load(comps)))

        def dcp_save(dcp_dir: str = dcp_dir) -> None:
            state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=dcp_dir)

        def dcp_load(dcp_dir: str = dcp_dir) -> None:
            state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=dcp_dir)
            model.load_state_dict(state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])

        times["dcp_save"].append(timed(dcp_save))
        times["dcp_load"].append(timed(dcp_load))
        if i + 1 < args.repeats and rank == 0:
            shutil.rmtree(dcp_dir)
            shutil.rmtree(run_dir)
        dist.barrier()
    return {"state_bytes": sum(sizes), "median_s": {k: statistics.median(v) for k, v in times.items()},
            "all_s": times}


def run_reads(args: argparse.Namespace) -> dict[str, Any]:
    world = dist.get_world_size()
    model, opt = build(args.width, args.layers, sharded=world > 1)
    storage = CountingStorage()
    comps = [StateComponent("model", model, SharingPattern.SHARDED),
             StateComponent("optim", OptimizerByName(opt, model), SharingPattern.SHARDED)]
    target = local_bytes({"m": model.state_dict(), "o": get_optimizer_state_dict(model, opt)})
    with CheckpointCoordinator(os.path.join(args.root, f"ckpt-{args.repeats - 1}"), timeout=600, storage=storage, read_only=True) as c:
        c.load(comps)
    mine = {"rank": dist.get_rank(), "read_bytes": storage.read, "target_bytes": target}
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return {"world": world, "ranks": out}


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    result = run_speed(args) if args.phase == "speed" else run_reads(args)
    if dist.get_rank() == 0:
        with open(os.path.join(args.root, f"{args.phase}-{dist.get_world_size()}.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def launch(args: argparse.Namespace, nproc: int, phase: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(__file__), "--worker", "--phase", phase, "--root", args.root, "--width", str(args.width),
           "--layers", str(args.layers), "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(os.path.join(args.root, f"{phase}-{nproc}.json")) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1100, help="weights + AdamW moments, MB (about)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="speed", help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    # 3 float32 values per weight (the weight and AdamW's two moments).
    args.width = args.width or int((args.size_mb * 1e6 / 12 / args.layers) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="bench_sharded-") as root:
        args.root = root
        speed = launch(args, 2, "speed")
        reads = {n: launch(args, n, "reads") for n in (1, 4)}
    report(args, speed, reads)


def report(args: argparse.Namespace, speed: dict[str, Any], reads: dict[int, dict[str, Any]]) -> None:
    med = speed["median_s"]
    gb = speed["state_bytes"] / 1e9
    out = {"state_gb": gb, "layers": args.layers, "width": args.width, "repeats": args.repeats, "median_s": med,
           "save_vs_dcp": med["dcp_save"] / med["ckpt_save"], "load_vs_dcp": med["dcp_load"] / med["ckpt_load"],
           "reads": {str(n): r["ranks"] for n, r in reads.items()}}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"FSDP2 model + AdamW state: {gb:.2f} GB at 2 ranks ({args.layers} x Linear({args.width}, {args.width})), "
          f"median of {args.repeats}")
    for what in ("save", "load"):
        c, d = med[f"ckpt_{what}"], med[f"dcp_{what}"]
        print(f"  {what}: ckpt SHARDED {c:.2f} s ({gb / c:.2f} GB/s), dcp {d:.2f} s ({gb / d:.2f} GB/s): "
              f"ckpt is {d / c:.2f}x DCP's speed")
    for n, r in reads.items():
        for row in r["ranks"]:
            print(f"  2 -> {n}: rank {row['rank']} read {row['read_bytes'] / 1e6:.1f} MB of tensor files for "
                  f"{row['target_bytes'] / 1e6:.1f} MB of target shards ({row['read_bytes'] / row['target_bytes']:.3f}x)")


if __name__ == "__main__":
    main()
