"""How much talking between ranks a save and a load of a tiny state cost, as the world size grows.

Spawns W gloo ranks on this machine for each W asked for, and on every rank: builds a coordinator, saves a
tiny state (a REPLICATED model of `--tensors` tensors of 8 floats, a PER_RANK and a GLOBAL value) twice
(the second save declares the same components, so a plan can be reused), then loads it.
The communicator's counters (ckpt/comm/phases.py `PhaseStats`) give, per phase and rank, the collective calls, the
payload bytes sent and received, and the seconds spent in exchanges. Printed per operation and phase:
collectives per rank, bytes received by rank 0 and by the busiest other rank, bytes over all ranks, and the
slowest rank's seconds. The state is tiny on purpose: what is left is coordination.

    python tools/bench_coordination.py --ranks 1,2,4,8,16 [--tensors 4] [--json out.json]

The ranks share this machine's cores, so seconds grow with W for reasons a real cluster does not have; the
message and byte counts are exact and do not depend on the machine. Bytes are the logical payload
(ckpt/comm/phases.py `PhaseStats`), not what the backend's algorithm puts on the wire.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPS = ("save (new plan)", "save (same declarations)", "load")


def _rank(rank: int, world: int, init_file: str, run_dir: str, tensors: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from ckpt import CheckpointCoordinator, SharingPattern, StateComponent

    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=300))
        coord = CheckpointCoordinator(run_dir, timeout=timedelta(seconds=300))
        coord.comm.reset_stats()

        def components() -> list[StateComponent]:
            # Plain dicts are components (loaded in place).
            return [StateComponent("model", {f"w{i}": torch.ones(8) * i for i in range(tensors)},
                                   SharingPattern.REPLICATED),
                    StateComponent("rng", {"seed": rank}, SharingPattern.PER_RANK),
                    StateComponent("data", {"epoch": 1}, SharingPattern.GLOBAL)]

        out: dict[str, Any] = {}
        for op, call in zip(OPS, (lambda: coord.save(1, components()), lambda: coord.save(2, components()),
                                  lambda: coord.load(components())), strict=True):
            started = time.perf_counter()
            call()
            wall = time.perf_counter() - started
            out[op] = {"wall": wall, "phases": {k: v.to_plain() for k, v in coord.comm.reset_stats().items()}}
        coord.close()
        queue.put((rank, out))
    except BaseException as exc:  # reported to the parent, which fails the run
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_world(world: int, tensors: int) -> list[dict]:
    """Every rank's counters for each operation, at `world` ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "rdv"), os.path.join(tmp, "run"), tensors,
                                                    queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    bad = {r: v for r, v in results.items() if isinstance(v, str)}
    if bad:
        raise SystemExit(f"{world} ranks: failed: {bad}")
    return [results[r] for r in range(world)]


def summarize(world: int, per_rank: list[dict]) -> list[dict]:
    """One row per operation and phase: collectives per rank, bytes at rank 0, the busiest other rank, in all."""
    rows = []
    for op in OPS:
        phases = sorted({p for r in per_rank for p in r[op]["phases"]})
        for phase in [*phases, "(all phases)"]:
            def field(r: dict, name: str, op: str = op, phase: str = phase) -> float:
                stats = r[op]["phases"]
                if phase == "(all phases)":
                    return sum(s[name] for s in stats.values())
                return stats.get(phase, {}).get(name, 0)

            others = per_rank[1:] or per_rank[:0]
            rows.append({
                "world": world, "op": op, "phase": phase,
                "collectives": max(field(r, "collectives") for r in per_rank),
                "recv_rank0": field(per_rank[0], "bytes_received"),
                "sent_rank0": field(per_rank[0], "bytes_sent"),
                "recv_other_max": max((field(r, "bytes_received") for r in others), default=0),
                "sent_other_max": max((field(r, "bytes_sent") for r in others), default=0),
                "bytes_all_ranks": sum(field(r, "bytes_received") for r in per_rank),
                "seconds_max": max(field(r, "seconds") for r in per_rank),
                "wall_max": max(r[op]["wall"] for r in per_rank),
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8,16", help="world sizes, comma-separated")
    parser.add_argument("--tensors", type=int, default=4, help="tensors in the replicated model (8 floats each)")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    print(f"{'W':>3} {'operation':<25} {'phase':<14} {'coll':>5} {'recv r0':>9} {'sent r0':>9} "
          f"{'recv oth':>9} {'sent oth':>9} {'all ranks':>10} {'exch s':>7} {'wall s':>7}")
    for world in (int(w) for w in args.ranks.split(",")):
        for row in summarize(world, run_world(world, args.tensors)):
            rows.append(row)
            print(f"{world:>3} {row['op']:<25} {row['phase']:<14} {row['collectives']:>5} {row['recv_rank0']:>9} "
                  f"{row['sent_rank0']:>9} {row['recv_other_max']:>9} {row['sent_other_max']:>9} "
                  f"{row['bytes_all_ranks']:>10} {row['seconds_max']:>7.3f} {row['wall_max']:>7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
