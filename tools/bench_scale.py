"""How save and load times grow with the state's size and the number of ranks, with default settings.

    python tools/bench_scale.py                                   # 64 MB..1 GB, 1/2/4 ranks, both patterns
    python tools/bench_scale.py --sizes-mb 64,256,1024,4096 --ranks 1,2,4 --json docs/bench_scale.json

For each size S and world size N, under torchrun (gloo), a `CheckpointCoordinator(run_dir)` with no options:
- REPLICATED: every rank holds the same S bytes (as DDP does); the ranks share the writing.
- SHARDED: the S bytes are DTensors sharded over the N ranks (Shard(0) on a 1-D mesh, as FSDP2 does); each
  rank writes and reads its own S/N.
and, once per size, a raw write+fsync and read of S bytes by one process for the machine's own speed. Every
save goes to an emptied run dir after os.sync(); loads read what the page cache holds, into the live tensors.
Printed: a table of median seconds and GB/s (of the whole state), and how each time grows per doubling of
the size (1.00 per doubling = linear in bytes). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_save import Holder, make_state, raw_read, raw_write

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent


class LocalHolder(Holder):
    """Holder for DTensors: a load copies each shard's local tensor (what a model's own load_state_dict does
    with DTensors adds torch's per-op DTensor dispatch, the same for every checkpoint library)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.state[name].to_local().copy_(tensor.to_local())


def _sharded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state.items()}


def child(args: argparse.Namespace) -> None:
    """One (size, pattern) case on every rank of a torchrun job; rank 0 writes the result as JSON."""
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank()
    pattern = SharingPattern[args.pattern]
    state = make_state(args.size_mb, args.tensors)
    if pattern is SharingPattern.SHARDED:
        state = _sharded(state)
    coord = CheckpointCoordinator(args.dir, timeout=timedelta(minutes=30))
    holder = LocalHolder(state) if pattern is SharingPattern.SHARDED else Holder(state)
    comps = [StateComponent("model", holder, pattern)]
    saves, loads = [], []
    for round_ in range(args.repeats + 1):  # round 0 warms up
        if rank == 0:
            shutil.rmtree(args.dir, ignore_errors=True)
            os.makedirs(args.dir, exist_ok=True)
        os.sync()
        dist.barrier()
        start = time.perf_counter()
        coord.save(1, comps, overwrite=True)
        dist.barrier()
        took = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        coord.load(comps, checkpoint=1)
        dist.barrier()
        if round_:
            saves.append(took)
            loads.append(time.perf_counter() - start)
    coord.close()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"save": saves, "load": loads}, f)
    dist.destroy_process_group()


def _run_case(size: float, ranks: int, pattern: str, args: argparse.Namespace, root: str) -> dict:
    out = os.path.join(root, "case.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           os.path.abspath(__file__), "--child", "--pattern", pattern, "--size-mb", str(size),
           "--tensors", str(args.tensors), "--repeats", str(args.repeats), "--dir", os.path.join(root, "run"),
           "--out", out]
    threads = max(1, (os.cpu_count() or 2) // ranks)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise SystemExit(f"{pattern} at {ranks} ranks, {size} MB failed:\n{done.stderr[-4000:]}")
    with open(out) as f:
        times = json.load(f)
    shutil.rmtree(os.path.join(root, "run"), ignore_errors=True)
    return {"size_mb": size, "ranks": ranks, "pattern": pattern,
            "save_s": statistics.median(times["save"]), "load_s": statistics.median(times["load"])}


def _raw(size: float, args: argparse.Namespace, root: str) -> dict:
    state = make_state(size, args.tensors)
    out = {k: torch.empty_like(v) for k, v in state.items()}
    path = os.path.join(root, "raw")
    writes, reads = [], []
    for round_ in range(args.repeats + 1):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        os.sync()
        start = time.perf_counter()
        raw_write(state, path)
        took = time.perf_counter() - start
        start = time.perf_counter()
        raw_read(state, path, out)
        if round_:
            writes.append(took)
            reads.append(time.perf_counter() - start)
    shutil.rmtree(path, ignore_errors=True)
    return {"size_mb": size, "ranks": 1, "pattern": "raw", "save_s": statistics.median(writes),
            "load_s": statistics.median(reads)}


def report(rows: list[dict]) -> None:
    print(f"{'case':28} {'size':>8} {'save s':>8} {'GB/s':>7} {'load s':>8} {'GB/s':>7}")
    for r in rows:
        gb = r["size_mb"] / 1e3
        name = "raw write+fsync / read" if r["pattern"] == "raw" else f"{r['pattern']} x{r['ranks']} ranks"
        print(f"{name:28} {r['size_mb']:6.0f}MB {r['save_s']:8.3f} {gb / r['save_s']:7.2f} "
              f"{r['load_s']:8.3f} {gb / r['load_s']:7.2f}")
    print("\ngrowth per doubling of the size (time ratio ** (1 / doublings); 1.00 = linear in bytes):")
    by_case: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["pattern"], r["ranks"]), []).append(r)
    for (pattern, ranks), case in by_case.items():
        case.sort(key=lambda r: r["size_mb"])
        if len(case) < 2:
            continue
        a, b = case[0], case[-1]
        n = math.log2(b["size_mb"] / a["size_mb"])
        grow = {k: (b[k] / a[k]) ** (1 / n) / 2 for k in ("save_s", "load_s")}
        print(f"  {pattern} x{ranks}: save {grow['save_s']:.2f}, load {grow['load_s']:.2f} "
              f"({a['size_mb']:.0f} MB -> {b['size_mb']:.0f} MB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="64,256,1024", help="comma-separated state sizes in MB")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes")
    p.add_argument("--patterns", default="REPLICATED,SHARDED")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    p.add_argument("--size-mb", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-scale-", dir=os.environ.get("BENCH_DIR")) as root:
        for size in (float(s) for s in args.sizes_mb.split(",")):
            rows.append(_raw(size, args, root))
            for pattern in args.patterns.split(","):
                for ranks in (int(n) for n in args.ranks.split(",")):
                    rows.append(_run_case(size, ranks, pattern, args, root))
                    print(json.dumps(rows[-1]), flush=True)
    report(rows)
    if args.json:
        meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "repeats": args.repeats, "tensors": args.tensors}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
