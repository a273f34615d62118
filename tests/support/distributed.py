"""Run a function on N real processes joined by gloo, and collect what each rank returns or raises.

`run_ranks(world_size, fn, *args)` spawns fresh interpreters (so every test gets a clean
torch.distributed), initialises a gloo process group over a FileStore in a temp folder, calls
`fn(rank, world_size, *args)` on each, and returns the per-rank results. A rank that raises gives a
`RankFailure` in its slot instead of a result; a rank that dies without reporting (SIGKILL, os._exit)
gets a `RankFailure` of type "RankDied" naming its exit code; a rank that hangs past `timeout` fails the test.
`fn` must be importable at module level (tests define their workers as top-level functions).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class RankFailure:
    """What a rank raised: the exception's class name, message and traceback text."""

    type_name: str
    message: str
    traceback: str
    attrs: dict

    def __repr__(self) -> str:
        return f"RankFailure({self.type_name}: {self.message})"


def _entry(fn: Callable, rank: int, world_size: int, init_file: str, env: dict, args: tuple, queue) -> None:
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % int(env.get(
        "LOCAL_WORLD_SIZE", world_size))))
    import torch.distributed as dist

    try:
        if world_size > 0:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=120))
        result: Any = fn(rank, world_size, *args)
    except BaseException as exc:
        attrs = {k: v for k, v in vars(exc).items() if isinstance(v, str | int | float | tuple | list | dict | type(None))}
        result = RankFailure(type(exc).__name__, str(exc), traceback.format_exc(), attrs)
    queue.put((rank, result))
    queue.close()
    queue.join_thread()
    # Skip destroy_process_group: after an injected failure peers may be gone, and teardown could hang.
    os._exit(0)


def run_ranks(world_size: int, fn: Callable, *args: Any, env: dict | None = None, timeout: float = 180) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, env or {}, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            _collect(procs, queue, results, timeout)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]


def _collect(procs: list, queue, results: dict[int, Any], timeout: float) -> None:
    """Fill `results` from the queue; a rank whose process exited without a result is recorded as dead."""
    deadline = time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            rank, result = queue.get(timeout=0.2)
            results[rank] = result
            continue
        except queue_module.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
        if dead:
            time.sleep(0.5)  # a rank that reported just before exiting: its result is still in the pipe
            while True:
                try:
                    rank, result = queue.get_nowait()
                except queue_module.Empty:
                    break
                results[rank] = result
            for r in dead:
                if r not in results:
                    code = procs[r].exitcode
                    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    results[r] = RankFailure("RankDied", f"rank {r} died ({how}) without reporting", "", {"exitcode": code})
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(procs))) - set(results))
            raise AssertionError(f"ranks {missing} did not finish within {timeout}s; got {results}")


def failures(results: list) -> dict[int, RankFailure]:
    return {r: res for r, res in enumerate(results) if isinstance(res, RankFailure)}


def expect_ok(results: list) -> list:
    """The results, after checking that no rank failed (showing every failed rank's traceback)."""
    bad = failures(results)
    if bad:
        raise AssertionError("ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{f.traceback}" for r, f in bad.items()))
    return results


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
