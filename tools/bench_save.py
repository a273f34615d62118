"""Save/load speed of ckpt against the disk and against torch.save and torch.distributed.checkpoint.

    python tools/bench_save.py                       # 1 GB in 64 tensors, 1 rank
    python tools/bench_save.py --world-size 4        # REPLICATED split across 4 ranks (runs torchrun)
    python tools/bench_save.py --size-mb 256 --repeats 5 --json

Every case runs on the same state in the same run, so ratios compare like with like. Each timed save
writes to a fresh folder and includes fsync; loads read files the page cache already holds, for every
reader alike. Targets from the project's speed goals are printed with PASS/MISS; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel


class Holder:
    """A Stateful whose load copies into the tensors it already has, as a model's load_state_dict does."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.state[name].copy_(tensor)


def make_state(size_mb: float, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`count` float32 tensors of random values (incompressible) totalling about `size_mb` MB."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, int(size_mb * 1e6 / 4 / count))
    return {f"layer{i:05d}.weight": torch.randn(per, generator=gen) for i in range(count)}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


# ---- the cases ---------------------------------------------------------------------------------

def raw_write(state: dict[str, torch.Tensor], path: str) -> None:
    with open(os.path.join(path, "raw.bin"), "wb", buffering=0) as f:
        for t in state.values():
            f.write(memoryview(t.view(torch.uint8).numpy()))
        os.fsync(f.fileno())


def raw_read(state: dict[str, torch.Tensor], path: str, out: dict[str, torch.Tensor]) -> None:
    with open(os.path.join(path, "raw.bin"), "rb", buffering=0) as f:
        for name in state:
            f.readinto(memoryview(out[name].view(torch.uint8).numpy()))


def torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    with open(os.path.join(path, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: str) -> dict:
    return torch.load(os.path.join(path, "state.pt"), weights_only=True)


def dcp_save(state: dict[str, torch.Tensor], path: str) -> None:
    dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def dcp_load(path: str, out: dict[str, torch.Tensor]) -> None:
    dcp.load(out, checkpoint_id=path, no_dist=not dist.is_initialized())


def ours_save(coord: CheckpointCoordinator, state: dict[str, torch.Tensor], level: ValidationLevel | None,
              pattern: SharingPattern = SharingPattern.REPLICATED, **kw) -> None:
    coord.save(1, [StateComponent("model", Holder(state), pattern, validation_level=level)], overwrite=True, **kw)


def timed_fresh(coord: CheckpointCoordinator, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of a collective save into an emptied run dir (rank 0 empties it, untimed)."""
    times = []
    for _ in range(repeats):
        if dist.get_rank() == 0:
            shutil.rmtree(coord.run_dir, ignore_errors=True)
            os.makedirs(coord.run_dir, exist_ok=True)
        os.sync()
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_load(coord: CheckpointCoordinator, out: dict[str, torch.Tensor], pattern=SharingPattern.REPLICATED,
              in_place: bool = False) -> None:
    coord.load([StateComponent("model", Holder(out), pattern)], checkpoint=1, in_place=in_place)


def supports_async(coord: CheckpointCoordinator) -> bool:
    import inspect

    return "async_save" in inspect.signature(coord.save).parameters


# ---- one-rank benchmark ------------------------------------------------------------------------

def interleaved(cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]], repeats: int
                ) -> dict[str, float]:
    """Median seconds per case. The cases run in rounds, in a new (seeded) order each round, so drifting
    conditions and the disk's history hit every case alike, after one untimed warm-up round. Before each
    run: its setup, then os.sync() so no case pays for another's dirty pages."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(0).shuffle
    for round_ in range(repeats + 1):
        shuffle(order)  # a fixed order lets the disk's history land on the same case every round
        for name in order:
            fn, setup = cases[name]
            if setup:
                setup()
            os.sync()
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up: a VM disk's first large writes run several times slower
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_single(args: argparse.Namespace, root: str) -> dict:
    state = make_state(args.size_mb, args.tensors)
    total = nbytes(state)
    out = {k: torch.empty_like(v) for k, v in state.items()}
    raw_dir, pt_dir, dcp_dir = (os.path.join(root, n) for n in ("raw", "pt", "dcp"))
    coord = CheckpointCoordinator(os.path.join(root, "ours"), timeout=timedelta(minutes=30))

    def clear_ours() -> None:
        coord.wait()
        shutil.rmtree(coord.run_dir, ignore_errors=True)
        os.makedirs(coord.run_dir)

    blocked: list[float] = []

    def ours_async() -> None:
        start = time.perf_counter()
        ours_save(coord, state, None, async_save=True)
        blocked.append(time.perf_counter() - start)
        coord.wait()

    save_cases = {
        "raw write+fsync": (lambda: raw_write(state, raw_dir), lambda: fresh(root, "raw")),
        "torch.save": (lambda: torch_save(state, pt_dir), lambda: fresh(root, "pt")),
        "dcp.save": (lambda: dcp_save(state, dcp_dir), lambda: fresh(root, "dcp")),
        # What a user gets: CheckpointCoordinator(run_dir) and a StateComponent with no options (one rank has
        # no replicas to compare, so no validation level changes this case).
        "ckpt save (defaults)": (lambda: ours_save(coord, state, None), clear_ours),
    }
    dcp_blocked: list[float] = []

    def dcp_async() -> None:
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=dcp_dir, no_dist=not dist.is_initialized())
        dcp_blocked.append(time.perf_counter() - start)
        future.result()

    if supports_async(coord):
        # In the same rounds as the others (its untimed first run allocates the staging buffers it reuses).
        save_cases["ckpt async: total"] = (ours_async, clear_ours)
        save_cases["dcp.async_save: total"] = (dcp_async, lambda: fresh(root, "dcp"))
    rows = interleaved(save_cases, args.repeats)
    if blocked:
        rows["ckpt async: caller blocked"] = statistics.median(blocked[1:])
        rows["dcp.async_save: caller blocked"] = statistics.median(dcp_blocked[1:])

    def ours_verify(flag: bool) -> Callable[[], object]:
        def setup() -> None:
            coord.verify_on_load = flag
        return setup

    load_cases = {
        "raw read": (lambda: raw_read(state, raw_dir, out), None),
        "torch.load": (lambda: torch_load(pt_dir), None),
        "dcp.load": (lambda: dcp_load(dcp_dir, out), None),
        "ckpt load": (lambda: ours_load(coord, out), ours_verify(True)),
        "ckpt load (in place)": (lambda: ours_load(coord, out, in_place=True), ours_verify(True)),
        "ckpt load (in place, no digest check)": (lambda: ours_load(coord, out, in_place=True), ours_verify(False)),
    }
    rows.update(interleaved(load_cases, args.repeats))
    coord.verify_on_load = True
    if not all(torch.equal(out[k], state[k]) for k in state):
        raise SystemExit("ckpt load did not restore the state exactly")
    return {"bytes": total, "tensors": len(state), "seconds": rows}


def bench_small(args: argparse.Namespace, root: str) -> dict:
    """Many small tensors: per-tensor overhead against torch.save / torch.load of the same dict."""
    state = make_state(args.small_count * 4096 / 1e6, args.small_count, seed=1)
    out = {k: torch.empty_like(v) for k, v in state.items()}
    pt_dir = os.path.join(root, "pt_small")
    coord = CheckpointCoordinator(os.path.join(root, "ours_small"))

    def clear_ours() -> None:
        shutil.rmtree(coord.run_dir, ignore_errors=True)
        os.makedirs(coord.run_dir)

    rows = interleaved({
        "torch.save": (lambda: torch_save(state, pt_dir), lambda: fresh(root, "pt_small")),
        "ckpt save": (lambda: ours_save(coord, state, ValidationLevel.NONE), clear_ours),
    }, args.repeats)
    rows.update(interleaved({
        "torch.load": (lambda: torch_load(pt_dir), None),
        "ckpt load": (lambda: ours_load(coord, out), None),
    }, args.repeats))
    return {"bytes": nbytes(state), "tensors": len(state), "seconds": rows}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(size_mb: float, count: int, run_dir: str, level: str) -> None:
    """In a fresh process: build the state, reset the kernel's peak-RSS mark, save once, report."""
    state = make_state(size_mb, count)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak below belongs to the save alone
    before = _rss_kib("VmRSS")
    ours_save(CheckpointCoordinator(run_dir), state, ValidationLevel(level))
    peak = _rss_kib("VmHWM")
    coord = CheckpointCoordinator(run_dir)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_load = _rss_kib("VmRSS")
    coord.load([StateComponent("model", Holder(state), SharingPattern.REPLICATED)])
    print(json.dumps({"before_save_bytes": before * 1024, "peak_bytes": peak * 1024,
                      "before_load_bytes": before_load * 1024, "load_peak_bytes": _rss_kib("VmHWM") * 1024,
                      "state_bytes": nbytes(state)}))


def memory_probe(args: argparse.Namespace, root: str) -> dict:
    """Peak resident memory of a fresh process while it saves the state once."""
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child", "--size-mb", str(args.size_mb),
                          "--tensors", str(args.tensors), "--dir", os.path.join(root, "mem"),
                          "--validation", args.validation], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"memory probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- multi-rank benchmark (under torchrun) -----------------------------------------------------

def bench_ranks(args: argparse.Namespace, root: str) -> dict | None:
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    state = make_state(args.size_mb, args.tensors)  # identical on every rank: replicas
    level = ValidationLevel(args.validation)
    coord = CheckpointCoordinator(os.path.join(root, "ours_ranks"), timeout=timedelta(minutes=30))
    one = CheckpointCoordinator(os.path.join(root, "ours_one_writer"), timeout=timedelta(minutes=30))
    r = args.repeats

    rows = {
        "ckpt GLOBAL, rank 0 writes all": timed_fresh(
            one, lambda: ours_save(one, state, ValidationLevel.NONE, SharingPattern.GLOBAL), r),
        f"ckpt REPLICATED, {world} writers": timed_fresh(coord, lambda: ours_save(coord, state, ValidationLevel.NONE), r),
        f"ckpt REPLICATED, {world} writers ({level.value})": timed_fresh(coord, lambda: ours_save(coord, state, level), r),
        f"ckpt REPLICATED, {world} writers (defaults)": timed_fresh(coord, lambda: ours_save(coord, state, None), r),
    }
    written: dict[int, int] = {}
    if rank == 0:
        with open(os.path.join(coord.run_dir, "checkpoint-00000001", "checkpoint_manifest.json")) as f:
            manifest = json.load(f)
        for file in manifest["components"]["model"]["files"]:
            written[file["writer_rank"]] = written.get(file["writer_rank"], 0) + file["nbytes"]
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    total = sum(written.values())
    return {"bytes": nbytes(state), "world_size": world, "seconds": rows,
            "share_written_by_rank": {str(k): v / total for k, v in sorted(written.items())}}


# ---- reporting ---------------------------------------------------------------------------------

def table(title: str, total: int, rows: dict[str, float], ref: str) -> list[str]:
    lines = [title, f"  {'case':40} {'seconds':>9} {'GB/s':>8} {'x ' + ref:>14}"]
    for name, secs in rows.items():
        lines.append(f"  {name:40} {secs:9.3f} {total / secs / 1e9:8.2f} {rows[ref] / secs:14.2f}")
    return lines


def targets(result: dict, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    out = []
    s = result.get("single", {}).get("seconds", {})
    if s:
        ours = s["ckpt save (defaults)"]
        out.append(("sync save >= 0.9x raw write+fsync", s["raw write+fsync"] / ours >= 0.9,
                    f"{s['raw write+fsync'] / ours:.2f}x"))
        out.append(("sync save >= 1.2x torch.save", s["torch.save"] / ours >= 1.2, f"{s['torch.save'] / ours:.2f}x"))
        out.append(("sync save >= 1.2x dcp.save", s["dcp.save"] / ours >= 1.2, f"{s['dcp.save'] / ours:.2f}x"))
        if "ckpt async: caller blocked" in s:
            out.append(("async: caller blocked <= 10% of sync", s["ckpt async: caller blocked"] <= 0.10 * ours,
                        f"{s['ckpt async: caller blocked'] / ours:.1%}"))
            out.append(("async: total <= 1.1x sync", s["ckpt async: total"] <= 1.1 * ours,
                        f"{s['ckpt async: total'] / ours:.2f}x"))
            if "dcp.async_save: caller blocked" in s:
                theirs = s["dcp.async_save: caller blocked"]
                out.append(("async: caller blocked <= dcp.async_save's", s["ckpt async: caller blocked"] <= theirs,
                            f"{s['ckpt async: caller blocked'] / theirs:.2f}x"))
        for case in ("ckpt load", "ckpt load (in place)"):
            out.append((f"{case} >= 0.9x raw read", s["raw read"] / s[case] >= 0.9, f"{s['raw read'] / s[case]:.2f}x"))
            out.append((f"{case} >= 1.2x dcp.load", s["dcp.load"] / s[case] >= 1.2, f"{s['dcp.load'] / s[case]:.2f}x"))
    sm = result.get("small", {}).get("seconds", {})
    if sm:
        out.append(("small tensors: save <= 1.5x torch.save", sm["ckpt save"] <= 1.5 * sm["torch.save"],
                    f"{sm['ckpt save'] / sm['torch.save']:.2f}x"))
        out.append(("small tensors: load <= 1.5x torch.load", sm["ckpt load"] <= 1.5 * sm["torch.load"],
                    f"{sm['ckpt load'] / sm['torch.load']:.2f}x"))
    mem = result.get("memory")
    if mem:
        # The interpreter and torch take ~0.4 GB before any state exists; the target is about what the save
        # adds on top of the state it is saving.
        extra = mem["peak_bytes"] - mem["before_save_bytes"]
        state = result["single"]["bytes"]
        out.append(("save's peak extra memory <= 0.25x state", extra <= 0.25 * state,
                    f"+{extra / 1e9:.3f} GB over {state / 1e9:.2f} GB of state"))
        if "load_peak_bytes" in mem:
            extra = mem["load_peak_bytes"] - mem["before_load_bytes"]
            out.append(("load's peak extra memory <= 0.25x state", extra <= 0.25 * state,
                        f"+{extra / 1e9:.3f} GB over {state / 1e9:.2f} GB of state"))
    ranks = result.get("ranks")
    if ranks:
        share = max(ranks["share_written_by_rank"].values())
        out.append(("replicated: each rank writes <= 30%", share <= 0.30, f"max {share:.1%}"))
        rows = ranks["seconds"]
        split, single = rows[f"ckpt REPLICATED, {ranks['world_size']} writers"], rows["ckpt GLOBAL, rank 0 writes all"]
        out.append(("replicated: wall <= 1 rank writing all", split <= single, f"{split:.2f}s vs {single:.2f}s"))
    return out


def report(result: dict, args: argparse.Namespace) -> None:
    lines = [f"ckpt benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, dir {args.dir}, "
             f"validation {args.validation}, median of {args.repeats}"]
    if "single" in result:
        single = result["single"]
        rows = single["seconds"]
        saves = {k: v for k, v in rows.items() if "load" not in k and "read" not in k}
        loads = {k: v for k, v in rows.items() if k not in saves}
        head = f"{single['bytes'] / 1e9:.2f} GB in {single['tensors']} tensors"
        lines += table(f"\nsave, 1 rank, {head}", single["bytes"], saves, "raw write+fsync")
        lines += table(f"\nload, 1 rank, {head}", single["bytes"], loads, "raw read")
    if "small" in result:
        sm = result["small"]
        lines += table(f"\n{sm['tensors']} tensors of 4 KB", sm["bytes"], sm["seconds"], "torch.save")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"\npeak resident memory during a sync save: {m['peak_bytes'] / 1e9:.3f} GB; before it "
                     f"(interpreter + {m['state_bytes'] / 1e9:.2f} GB of state): {m['before_save_bytes'] / 1e9:.3f} GB")
        if "load_peak_bytes" in m:
            lines.append(f"peak resident memory during the default load that follows: {m['load_peak_bytes'] / 1e9:.3f} "
                         f"GB; before it: {m['before_load_bytes'] / 1e9:.3f} GB")
    if "ranks" in result:
        rk = result["ranks"]
        lines += table(f"\n{rk['world_size']} ranks, each holding the same {rk['bytes'] / 1e9:.2f} GB", rk["bytes"],
                       rk["seconds"], "ckpt GLOBAL, rank 0 writes all")
        lines.append("  share of the bytes each rank wrote: " + ", ".join(
            f"rank {k}: {v:.1%}" for k, v in rk["share_written_by_rank"].items()))
    lines.append("\ntargets:")
    lines += [f"  {'PASS' if ok else 'MISS'}  {name:44} {detail}" for name, ok, detail in targets(result, args)]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=1024, help="state size in MB (default 1024)")
    p.add_argument("--tensors", type=int, default=64, help="number of tensors (default 64)")
    p.add_argument("--world-size", type=int, default=1, help="ranks; above 1 also runs the REPLICATED split case")
    p.add_argument("--dir", default=None, help="target folder (default: a temp folder, removed afterwards)")
    p.add_argument("--validation", default="tensor", choices=[v.value for v in ValidationLevel],
                   help="validation level of the multi-rank case beside the defaults (default tensor)")
    p.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported")
    p.add_argument("--small-count", type=int, default=10_000, help="tensors in the small-tensor case (0 skips)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--_rank-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, args.world_size)))
    root = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    os.makedirs(root, exist_ok=True)
    if args._memory_child:
        memory_child(args.size_mb, args.tensors, root, args.validation)
        return
    try:
        if args._rank_child:
            out = bench_ranks(args, root)
            if out is not None:
                with open(os.path.join(root, "ranks.json"), "w") as f:
                    json.dump(out, f)
            return
        result = {"args": vars(args), "single": bench_single(args, root)}
        if args.small_count:
            result["small"] = bench_small(args, root)
        if not args.no_memory:
            result["memory"] = memory_probe(args, root)
        if args.world_size > 1:
            shutil.rmtree(os.path.join(root, "pt"), ignore_errors=True)
            child = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world_size}",
                     os.path.abspath(__file__), "--_rank-child", "--dir", root, "--size-mb", str(args.size_mb),
                     "--tensors", str(args.tensors), "--validation", args.validation, "--repeats", str(args.repeats)]
            done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                raise SystemExit(f"the {args.world_size}-rank run failed:\n{done.stderr[-4000:]}")
            with open(os.path.join(root, "ranks.json")) as f:
                result["ranks"] = json.load(f)
        result["targets"] = [{"target": n, "met": ok, "measured": d} for n, ok, d in targets(result, args)]
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            report(result, args)
    finally:
        if args.dir is None and not args._rank_child:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
