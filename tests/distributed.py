"""Run a function on N real processes joined by gloo, and collect what each rank returns or raises.

`run_ranks(world_size, fn, *args)` spawns fresh interpreters (so every test gets a clean
torch.distributed), initialises a gloo process group over a FileStore in a temp folder, calls
`fn(rank, world_size, *args)` on each, and returns the per-rank results. A rank that raises gives a
`RankFailure` in its slot instead of a result; a rank that hangs past `timeout` fails the test.
`fn` must be importable at module level (tests define their workers as top-level functions).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
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
            for _ in range(world_size):
                rank, result = queue.get(timeout=timeout)
                results[rank] = result
        except Exception as exc:
            missing = sorted(set(range(world_size)) - set(results))
            raise AssertionError(f"ranks {missing} did not finish within {timeout}s; got {results}") from exc
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]


def failures(results: list) -> dict[int, RankFailure]:
    return {r: res for r, res in enumerate(results) if isinstance(res, RankFailure)}


def expect_ok(results: list) -> list:
    """The results, after checking that no rank failed (showing every failed rank's traceback)."""
    bad = failures(results)
    if bad:
        raise AssertionError("ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{f.traceback}" for r, f in bad.items()))
    return results
