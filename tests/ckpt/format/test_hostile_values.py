"""Hostile value (msgpack) files: whatever their bytes, decoding them is refused with a CorruptCheckpointError
naming the file and key path, never a crash. Decoding runs in a child process, so a signal death (the
SIGSEGV of a C-stack overflow) fails the test instead of killing the test run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import msgpack
import pytest
import torch

from ckpt import CheckpointCoordinator, CorruptCheckpointError, SharingPattern, StateComponent
from ckpt.format.serialization import MAX_DEPTH, flatten_state, unflatten_state
from tests.support.files import REPO
from tests.support.hostile import make_checkpoint, replace_file
from tests.support.workers import Box

VALID_CODES = range(1, 9)


def nested_tuples(depth: int, leaf=None) -> bytes:
    """The issue's crafted file: a tuple inside a tuple inside ... `depth` deep, under key 'k' (~1 KB at 200)."""
    inner = leaf
    for _ in range(depth):
        inner = msgpack.ExtType(1, msgpack.packb([inner]))
    return msgpack.packb({"k": inner})


def _random_nesting(rng: random.Random) -> bytes:
    """Containers of random kinds (tuple, OrderedDict, list, map) nested to a random depth, often past the limit."""
    value: object = rng.choice([None, 1, "x", b"y", msgpack.ExtType(rng.choice(VALID_CODES), b"")])
    for _ in range(rng.choice([5, 50, MAX_DEPTH - 1, MAX_DEPTH + 1, 300, 2000])):
        kind = rng.randrange(4)
        if kind == 0:
            value = msgpack.ExtType(1, msgpack.packb([value]))
        elif kind == 1:
            value = msgpack.ExtType(6, msgpack.packb([["k", value]]))
        elif kind == 2:
            value = [value]
        else:
            value = {"k": value}
    try:
        return msgpack.packb({"root": value})
    except ValueError:  # the packer's own depth limit on plain containers: pack the excess by hand
        return b"\x91" * 100_000 + b"\xc0"


def _huge_header(rng: random.Random) -> bytes:
    """A container, string, bin or extension header claiming up to 4 GiB, followed by a few bytes."""
    head = rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xdc", b"\xde"])  # *32 / *16 forms
    size = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFF, 1 << 20])
    width = 2 if head in (b"\xdc", b"\xde") else 4
    body = (size & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    if head == b"\xc9":
        body += bytes([rng.randrange(256)])  # the extension code
    return msgpack.packb({"a": 1})[:1] + b"\xa1k" + head + body + os.urandom(rng.randrange(16))


def _bad_extension(rng: random.Random) -> bytes:
    """An unknown extension code, or a known one with a random payload."""
    code = rng.choice([0, 9, 42, 127, *VALID_CODES])
    payload = rng.choice([os.urandom(rng.randrange(64)), msgpack.packb(["<f4", [10**18], b"1234"]),
                          msgpack.packb(["|O", [1], b"\x00" * 8]), msgpack.packb([[1, 2], "float64"]),
                          msgpack.packb(["x" * 10, "no_such_dtype"]), b"\xff\xfe", b"-" * 5000])
    if rng.random() < 0.2:  # a negative (msgpack-reserved) code, e.g. -1, a timestamp
        return b"\x81\xa1e\xd6" + bytes([rng.randrange(128, 256)]) + os.urandom(4)
    return msgpack.packb({"e": msgpack.ExtType(code, payload)})


def _mutated(rng: random.Random) -> bytes:
    state = {"a": (1, [2, {"b": torch.ones(2)}]), "c": {"d": "text", "e": 2**70}}
    data = bytearray(flatten_state(state, "c").skeleton)
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


GENERATORS = [_random_nesting, _huge_header, _bad_extension, _mutated]


def hostile_files(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [nested_tuples(200), nested_tuples(100_000)] + [rng.choice(GENERATORS)(rng) for _ in range(count)]


def _child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def _no_signal_death(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode >= 0, (f"killed by {signal.Signals(-proc.returncode).name}", proc.stderr[-2000:])


def test_hostile_value_files_are_refused_without_a_crash(tmp_path):
    files = hostile_files(seed=12, count=120)
    for i, data in enumerate(files):
        (tmp_path / f"{i:04d}.msgpack").write_bytes(data)
    proc = _child(f"from tests.support.hostile import decode_all; decode_all({str(tmp_path)!r})")
    _no_signal_death(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(files)
    refused = [r for r in results if r["type"] is not None]
    assert {r["type"] for r in refused} == {"CorruptCheckpointError"}, {r["type"] for r in refused}
    assert all(r["file"] in r["message"] and "component 'c'" in r["message"] for r in refused)
    # Both crafted files (the issue's ~200-deep tuples, and 100,000 deep) stop at the depth limit, at key k/0/0/...
    for crafted in results[:2]:
        assert crafted["type"] == "CorruptCheckpointError", crafted
        assert f"more than {MAX_DEPTH} containers deep" in crafted["message"], crafted
        assert crafted["key_path"] == "k" + "/0" * MAX_DEPTH, crafted["key_path"][:50]
    assert len(refused) > len(files) // 2, "most of these files are not valid skeletons"


def test_nesting_up_to_the_limit_round_trips_and_deeper_is_refused_on_save():
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = (deep,)
    flat = flatten_state({"k": deep}, "c")  # the state dict is depth 0, so 'k' holds MAX_DEPTH levels
    assert unflatten_state(flat.skeleton, {}, "c") == {"k": deep}
    with pytest.raises(Exception, match=f"nested more than {MAX_DEPTH} containers deep") as err:
        flatten_state({"k": [deep]}, "c")
    assert type(err.value).__name__ == "SerializationError"


def test_crafted_nested_tuples_fail_every_reader_cleanly(tmp_path):
    """The issue's crash: the API load, load(fallback=True), `ckpt verify` and `ckpt export` all died with
    SIGSEGV. Each now runs in a child process and fails with one clear message naming the file."""
    run = tmp_path / "run"
    with CheckpointCoordinator(run) as coord:
        older = coord.save(6, [StateComponent("model", Box({"w": torch.ones(3)}), SharingPattern.REPLICATED),
                               StateComponent("extra", Box({"step": 6}), SharingPattern.GLOBAL)])
    ckpt_dir = make_checkpoint(run)  # step 7, with extra/global.msgpack
    replace_file(ckpt_dir, "extra/global.msgpack", nested_tuples(200))
    load = ("from ckpt import CheckpointCoordinator, StateComponent, SharingPattern\n"
            "from tests.support.workers import Box\n"
            "comps = [StateComponent('model', Box({}), SharingPattern.REPLICATED),"
            " StateComponent('extra', Box({}), SharingPattern.GLOBAL)]\n"
            f"with CheckpointCoordinator({str(run)!r}) as c:\n"
            "    try:\n"
            "        c.load(comps)\n"
            "    except Exception as e:\n"
            "        print(type(e).__name__, e)\n"
            "    print('fallback', c.load(comps, fallback=True).path)\n")
    proc = _child(load)
    _no_signal_death(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert first.startswith("CorruptCheckpointError") and "extra/global.msgpack" in first and "key 'k/0/0" in first
    assert second == f"fallback {older}"
    cli = "import sys; from ckpt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    verify = subprocess.run([sys.executable, "-c", cli, "verify", ckpt_dir], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    _no_signal_death(verify)
    assert verify.returncode == 1 and "does not load" in verify.stdout and "extra/global.msgpack" in verify.stdout
    export = subprocess.run([sys.executable, "-c", cli, "export", ckpt_dir, "--component", "extra", "-o",
                             str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    _no_signal_death(export)
    assert export.returncode == 2 and len(export.stderr.strip().splitlines()) == 1, export.stderr
    assert "extra/global.msgpack" in export.stderr and "Traceback" not in export.stderr


def test_decode_errors_name_file_component_and_key_path():
    bad = msgpack.packb({"outer": {"inner": msgpack.ExtType(99, b"")}})
    with pytest.raises(CorruptCheckpointError) as err:
        unflatten_state(bad, {}, "opt", source="run/checkpoint-00000001/opt/global.msgpack")
    assert err.value.key_path == "outer/inner" and err.value.component == "opt"
    assert "run/checkpoint-00000001/opt/global.msgpack" in str(err.value) and "unknown type 99" in str(err.value)
