"""How much a background (async) save slows the training steps running beside it, and how long it blocks.

    python tools/bench_async_impact.py                  # the demo model, then a ~1 GB model (params + AdamW)
    python tools/bench_async_impact.py --models demo --rounds 5 --threads 2 --json out.json

For each model, on one process on this machine's CPU: the median training step (forward, backward, AdamW)
with no save running; a synchronous save's time; then, `--rounds` times, an async save followed by training
steps while it runs in the background. Printed: the caller's blocking time as a fraction of a synchronous
save, and the median step time while a save runs as a ratio of the median step without one (1.00 = no
impact). A step counts as "beside a save" when the save was still in flight when the step began; the
background save's duration is seen between steps, so it is rounded up to a step. The ratios
depend on the cores free at the time; run on a quiet machine for numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from trainers.demo.model import VOCAB, GPTConfig, TinyGPT

MODELS = {
    # The demo job's default model (trainers/demo/cli.py), with its batch.
    "demo": (GPTConfig(n_layer=3, n_head=4, d_model=96, block_size=64), 8),
    # ~75M parameters: 0.3 GB of weights and 0.6 GB of AdamW moments, ~0.9 GB of state; a small batch keeps
    # the CPU step around a second.
    "1gb": (GPTConfig(n_layer=6, n_head=16, d_model=1024, block_size=32), 1),
    # For a GPU (--device cuda): ~340M parameters, ~4 GB of weights and AdamW moments, steps of real size.
    "gpu4gb": (GPTConfig(n_layer=12, n_head=16, d_model=1536, block_size=256), 16),
}


@dataclass(frozen=True)
class Result:
    model: str
    state_mb: float
    step_s: float  # median step, no save running
    step_beside_save_s: float  # median step while a background save ran
    steps_beside_save: int
    sync_save_s: float
    blocking_s: float  # median time async save() held the caller
    background_s: float  # median time from async save() to the first step that found it committed


_MAX_STEPS_BESIDE = 500


def _trainer(name: str, device: str) -> tuple[TinyGPT, torch.optim.Optimizer, Callable[[], None]]:
    cfg, batch = MODELS[name]
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, VOCAB, (batch, cfg.block_size + 1), generator=gen, device=device)
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device != "cpu":  # a step's time is the device's, not the launch's
            torch.cuda.synchronize()

    return model, opt, step


def _state_mb(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    tensors = list(model.state_dict().values())
    tensors += [t for s in opt.state_dict()["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def measure(name: str, run_dir: str, steps: int, rounds: int, device: str = "cpu") -> Result:
    model, opt, step = _trainer(name, device)
    for _ in range(2):  # warm-up, and AdamW's moments exist from here on
        step()
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("optimizer", opt, SharingPattern.REPLICATED)]
    coord = CheckpointCoordinator(run_dir, timeout=600)
    plain = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        plain.append(time.perf_counter() - started)
    os.sync()
    started = time.perf_counter()
    coord.save(1, comps, async_save=False)
    sync_s = time.perf_counter() - started
    beside, blocking, background = [], [], []
    for r in range(rounds):
        shutil.rmtree(os.path.join(run_dir, f"checkpoint-{r + 1:08d}"), ignore_errors=True)
        os.sync()  # no round pays for the previous one's dirty pages
        started = time.perf_counter()
        handle = coord.save(r + 2, comps, async_save=True)
        blocking.append(time.perf_counter() - started)
        # Steps while the save is in flight (at least one, so a save shorter than a step still meets one).
        for i in range(_MAX_STEPS_BESIDE):
            if i and handle.done():
                break
            began = time.perf_counter()
            step()
            beside.append(time.perf_counter() - began)
        done_at = time.perf_counter()
        handle.wait()
        background.append(done_at - started)
    coord.close()
    return Result(name, _state_mb(model, opt), statistics.median(plain),
                  statistics.median(beside), len(beside), sync_s, statistics.median(blocking),
                  statistics.median(background))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,1gb", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="async saves per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the training step (on a machine shared with other jobs, "
                             "more threads than free cores make every step wait for the slowest)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model trains (cuda: device tensors staged through pinned buffers)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}, {os.cpu_count()} CPUs, {args.threads} training thread(s), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            res = measure(name, tmp, args.steps, args.rounds, args.device)
        results.append(res)
        slow = f"{res.step_beside_save_s / res.step_s:.2f}x ({res.steps_beside_save} steps)"
        print(f"{res.model}: state {res.state_mb:.0f} MB; step {res.step_s * 1e3:.1f} ms; "
              f"step beside a background save: {slow}; sync save {res.sync_save_s:.3f} s; "
              f"async blocking {res.blocking_s:.3f} s = {res.blocking_s / res.sync_save_s:.2f}x the sync save; "
              f"background save done after {res.background_s:.3f} s "
              f"({res.background_s / res.sync_save_s:.2f}x the sync save)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
