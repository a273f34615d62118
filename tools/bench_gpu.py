"""Save and load of a GPU-resident state: ckpt against the hardware and against torch.save and DCP, in one run.

    python tools/bench_gpu.py                        # 4 GB in 64 float32 tensors on cuda:0, 3 rounds
    python tools/bench_gpu.py --size-gb 8 --json out.json
    python tools/bench_gpu.py --device cpu --size-gb 0.2   # the same cases on the CPU (to try the script)

One process (a process group of one: gloo for the coordinator, nccl for the device). Every case works on the
same tensors. Saves write into a fresh folder and include fsync, with os.sync() before each; loads read what
the page cache holds after the saves, into the same device tensors for every reader (a model's live state).
The limits printed beside them: a device-to-host copy into pinned memory, a write+fsync of the host bytes,
a read of the file into pinned memory and its host-to-device copy. Async saves: how long the caller is
blocked, and when the checkpoint is committed. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_save import Holder  # its load copies into the tensors it has, on their device

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_state(size_gb: float, count: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    per = max(1, int(size_gb * 1e9 / 4 / count))
    return {f"layer{i:03d}.weight": torch.randn(per, generator=gen, device=device) for i in range(count)}


def _fresh(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def run_rounds(cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]], repeats: int,
               device: str) -> dict[str, list[float]]:
    """Seconds per case and round, after one untimed warm-up round; cases in a new (seeded) order each round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_ in range(repeats + 1):
        random.Random(round_).shuffle(order)
        for name in order:
            fn, setup = cases[name]
            if setup is not None:
                setup()
            _sync(device)
            os.sync()
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def bench(args: argparse.Namespace, root: str) -> dict:
    device = args.device
    state = make_state(args.size_gb, args.tensors, device)
    total = sum(t.numel() * t.element_size() for t in state.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=device == "cuda") for k, v in state.items()}
    dirs = {n: os.path.join(root, n) for n in ("raw", "pt", "dcp", "dcp_async", "ours", "ours_async")}
    ours = CheckpointCoordinator(dirs["ours"], timeout=timedelta(minutes=30))
    ours_async = CheckpointCoordinator(dirs["ours_async"], timeout=timedelta(minutes=30))
    comps = [StateComponent("model", Holder(state), SharingPattern.REPLICATED)]
    blocked: dict[str, list[float]] = {"ckpt async save": [], "dcp.async_save": []}

    def d2h() -> None:
        for k, v in state.items():
            pinned[k].copy_(v, non_blocking=True)

    def raw_write() -> None:
        with open(os.path.join(dirs["raw"], "raw.bin"), "wb", buffering=0) as f:
            for t in pinned.values():
                f.write(memoryview(t.view(torch.uint8).numpy()))
            os.fsync(f.fileno())

    def torch_save() -> None:
        with open(os.path.join(dirs["pt"], "state.pt"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def ckpt_async() -> None:
        start = time.perf_counter()
        handle = ours_async.save(1, comps, overwrite=True, async_save=True)
        blocked["ckpt async save"].append(time.perf_counter() - start)
        handle.wait()

    def dcp_async() -> None:
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=dirs["dcp_async"])
        blocked["dcp.async_save"].append(time.perf_counter() - start)
        future.result()

    def emptied(coord: CheckpointCoordinator) -> Callable[[], None]:
        return lambda: _fresh(coord.run_dir)

    saves = {
        f"{'D2H copy into pinned memory' if device == 'cuda' else 'copy'}": (d2h, None),
        "raw write+fsync of the host bytes": (raw_write, lambda: _fresh(dirs["raw"])),
        "torch.save": (torch_save, lambda: _fresh(dirs["pt"])),
        "dcp.save": (lambda: dcp.save(state, checkpoint_id=dirs["dcp"]), lambda: _fresh(dirs["dcp"])),
        "dcp.async_save (until done)": (dcp_async, lambda: _fresh(dirs["dcp_async"])),
        "ckpt save": (lambda: ours.save(1, comps, overwrite=True), emptied(ours)),
        "ckpt async save (until committed)": (ckpt_async, emptied(ours_async)),
    }
    save_times = run_rounds(saves, args.repeats, device)
    for name, values in blocked.items():
        save_times[f"{name}: caller blocked"] = values[1:]

    out = state  # loads go into the live device tensors, as a resume does

    def raw_read() -> None:
        with open(os.path.join(dirs["raw"], "raw.bin"), "rb", buffering=0) as f:
            for k, t in pinned.items():
                f.readinto(memoryview(t.view(torch.uint8).numpy()))
                out[k].copy_(t, non_blocking=True)

    def torch_load() -> None:
        loaded = torch.load(os.path.join(dirs["pt"], "state.pt"), weights_only=True, map_location=device)
        for k, v in loaded.items():
            out[k].copy_(v)

    loads = {
        "raw read into pinned + H2D copy": (raw_read, None),
        "torch.load": (torch_load, None),
        "dcp.load": (lambda: dcp.load(out, checkpoint_id=dirs["dcp"]), None),
        "ckpt load": (lambda: ours.load(comps, checkpoint=1), None),
        "ckpt load in_place": (lambda: ours.load(comps, checkpoint=1, in_place=True), None),
    }
    load_times = run_rounds(loads, args.repeats, device)
    ours.close()
    ours_async.close()
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "bytes": total,
            "tensors": len(state), "save": save_times, "load": load_times}


def report(res: dict) -> None:
    gb = res["bytes"] / 1e9
    print(f"{gb:.2f} GB in {res['tensors']} tensors on {res['device']}; medians of the rounds")
    med = {sect: {k: statistics.median(v) for k, v in res[sect].items() if v} for sect in ("save", "load")}
    for sect in ("save", "load"):
        print(f"\n{sect}:")
        for name, s in med[sect].items():
            print(f"  {name:42s} {s:8.3f} s  {gb / s:7.2f} GB/s")
    s, ld = med["save"], med["load"]
    raw_save = next(v for k, v in s.items() if k.startswith(("D2H", "copy"))) + s["raw write+fsync of the host bytes"]
    print("\nratios (higher is faster for ckpt):")
    print(f"  ckpt save vs D2H + raw write+fsync   {raw_save / s['ckpt save']:.2f}x")
    print(f"  ckpt save vs dcp.save                {s['dcp.save'] / s['ckpt save']:.2f}x")
    print(f"  ckpt save vs torch.save              {s['torch.save'] / s['ckpt save']:.2f}x")
    print(f"  ckpt async, caller blocked           {s['ckpt async save: caller blocked'] / s['ckpt save']:.3f} of a "
          f"sync save; dcp.async_save blocked {s['dcp.async_save: caller blocked'] / s['dcp.save']:.3f} of dcp.save")
    print(f"  ckpt async until committed vs dcp.async_save until done  "
          f"{s['dcp.async_save (until done)'] / s['ckpt async save (until committed)']:.2f}x")
    print(f"  ckpt load vs raw read + H2D           {ld['raw read into pinned + H2D copy'] / ld['ckpt load']:.2f}x")
    print(f"  ckpt load vs dcp.load                {ld['dcp.load'] / ld['ckpt load']:.2f}x")
    print(f"  ckpt load in_place vs dcp.load       {ld['dcp.load'] / ld['ckpt load in_place']:.2f}x")
    print(f"  ckpt load vs torch.load              {ld['torch.load'] / ld['ckpt load']:.2f}x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=4.0, help="state size in GB (default 4)")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (the median is printed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dir", default=os.environ.get("BENCH_DIR"), help="where the files go (default: a temp folder)")
    p.add_argument("--json", help="also write every round's seconds to this file")
    args = p.parse_args(argv)
    backend = "cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            res = bench(args, root)
    finally:
        dist.destroy_process_group()
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
