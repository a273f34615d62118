"""Save/load speed of ckpt on object storage against plain boto3 and DCP's fsspec writer, on one S3 server.

    python tools/bench_s3.py                           # 1 GB in 64 tensors against a local moto server
    python tools/bench_s3.py --size-mb 256 --repeats 3 --json
    python tools/bench_s3.py --endpoint http://host:9000 --bucket b   # an S3 server you already run
    python tools/bench_s3.py --s3fs-path DIR           # DCP's FsspecWriter, with s3fs installed in DIR

Without --endpoint it starts moto's S3 server (a Python process on 127.0.0.1, the one the tests use) in its
own process, so the server's CPU work does not share this process's interpreter lock. Every case moves the
same bytes to the same server in the same run, in rounds of a new seeded order; ratios are against plain boto3
(`upload_fileobj` / `download_fileobj` of those bytes as one object, its default multipart settings). DCP runs
in a subprocess whose path has s3fs (which pins its own botocore, so it is kept out of this process); without
s3fs the DCP case is reported as skipped. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The same state and Stateful as the local benchmark (this script's folder, tools/, is on the path).
from bench_save import Holder, make_state

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent, ValidationLevel
from ckpt.io.s3 import S3Options, S3Storage

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto() -> tuple[subprocess.Popen, str]:
    code = textwrap.dedent("""
        import logging, time
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s.start()
        print("http://%s:%d" % s.get_host_and_port(), flush=True)
        time.sleep(10**6)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dcp_case(endpoint: str, bucket: str, s3fs_path: str, size_mb: float, count: int, repeats: int) -> dict:
    """DCP's FsspecWriter/FsspecReader to s3:// in a subprocess that has s3fs on its path."""
    code = textwrap.dedent(f"""
        import json, statistics, sys, time, secrets
        sys.path.insert(0, {s3fs_path!r}); sys.path.insert(1, {os.path.dirname(os.path.abspath(__file__))!r})
        import fsspec, torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
        from bench_s3 import make_state
        state = make_state({size_mb}, {count})
        saves, loads = [], []
        for _ in range({repeats} + 1):
            path = "s3://{bucket}/dcp-" + secrets.token_hex(4)
            t = time.perf_counter()
            dcp.save(state, storage_writer=FsspecWriter(path, thread_count=8, sync_files=False,
                                                         endpoint_url={endpoint!r}))
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            dcp.load(state, storage_reader=FsspecReader(path, endpoint_url={endpoint!r}))
            loads.append(time.perf_counter() - t)
            fsspec.core.url_to_fs(path, endpoint_url={endpoint!r})[0].rm(path, recursive=True)
        print(json.dumps({{"save": statistics.median(saves[1:]), "load": statistics.median(loads[1:])}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **CREDS})
    if proc.returncode != 0:
        return {"skipped": "DCP fsspec case failed: " + proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    import boto3

    server, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    os.environ.update({**CREDS, "AWS_ENDPOINT_URL": endpoint} if not args.endpoint else {})
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        if not args.endpoint:
            client.create_bucket(Bucket=args.bucket)
        state = make_state(args.size_mb, args.tensors)
        blob = b"".join(memoryview(t.numpy()).cast("B") for t in state.values())
        total = len(blob)
        storage = S3Storage(S3Options(part_bytes=args.part_mb << 20, in_flight=args.in_flight))
        times: dict[str, list[float]] = {}
        last: dict[str, str] = {}

        def boto_up() -> None:
            last["boto"] = f"boto-{secrets.token_hex(4)}"
            client.upload_fileobj(io.BytesIO(blob), args.bucket, last["boto"])

        def boto_down() -> None:
            client.download_fileobj(args.bucket, last["boto"], io.BytesIO())
            client.delete_object(Bucket=args.bucket, Key=last["boto"])  # the server keeps objects in memory

        coord = CheckpointCoordinator(f"s3://{args.bucket}/ckpt-{secrets.token_hex(4)}", storage=storage,
                                      io_threads=args.io_threads, retention=RetentionPolicy(save_total_limit=1))
        steps = iter(range(1, 10**6))

        def ckpt_save() -> None:
            last["ckpt"] = next(steps)
            coord.save(last["ckpt"], [StateComponent("model", Holder(state), SharingPattern.GLOBAL,
                                                     validation_level=ValidationLevel.NONE)])

        def ckpt_load(in_place: bool) -> Callable[[], None]:
            def go() -> None:
                coord.load([StateComponent("model", Holder(state), SharingPattern.GLOBAL)], last["ckpt"],
                           in_place=in_place)
            return go

        pairs = [("boto3 upload_fileobj", boto_up, "boto3 download_fileobj", boto_down),
                 ("ckpt save", ckpt_save, "ckpt load", ckpt_load(False))]
        for r in range(args.repeats + 1):  # round 0 warms up (connections, first allocations) and is not kept
            random.Random(r).shuffle(pairs)
            for save_name, save, load_name, load in pairs:
                for name, fn in ((save_name, save), (load_name, load)):
                    t = timed(fn)
                    if r:
                        times.setdefault(name, []).append(t)
                if load_name == "ckpt load" and r:
                    times.setdefault("ckpt load (in place)", []).append(timed(ckpt_load(True)))
        coord.close()
        results = {name: statistics.median(ts) for name, ts in times.items()}
        dcp = (dcp_case(endpoint, args.bucket, args.s3fs_path, args.size_mb, args.tensors, args.repeats)
               if args.s3fs_path else {"skipped": "s3fs is not installed here (pass --s3fs-path DIR)"})
        if "save" in dcp:
            results["dcp.save (FsspecWriter)"], results["dcp.load (FsspecReader)"] = dcp["save"], dcp["load"]
        return {"bytes": total, "tensors": args.tensors, "endpoint": endpoint if args.endpoint else "moto (local)",
                "repeats": args.repeats, "part_mb": args.part_mb, "in_flight": args.in_flight,
                "io_threads": args.io_threads, "cpus": os.cpu_count(), "seconds": results,
                "dcp": dcp.get("skipped", "ran")}
    finally:
        if server is not None:
            server.kill()


def report(res: dict) -> str:
    gb = res["bytes"] / 1e9
    secs = res["seconds"]
    lines = [f"ckpt S3 benchmark: {gb:.2f} GB in {res['tensors']} tensors, {res['endpoint']}, {res['cpus']} CPUs, "
             f"median of {res['repeats']}; parts {res['part_mb']} MiB x {res['in_flight']} in flight, "
             f"{res['io_threads']} io threads", ""]
    for kind, base in (("save", "boto3 upload_fileobj"), ("load", "boto3 download_fileobj")):
        lines.append(f"{kind}\n  {'case':40} {'seconds':>8} {'GB/s':>8} {'x boto3':>8}")
        for name, s in secs.items():
            is_save = any(w in name for w in ("save", "upload"))
            if is_save == (kind == "save"):
                lines.append(f"  {name:40} {s:8.3f} {gb / s:8.2f} {secs[base] / s:8.2f}")
        lines.append("")
    if res["dcp"] != "ran":
        lines.append(f"DCP fsspec case skipped: {res['dcp']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=1024)
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto (credentials from AWS settings)")
    p.add_argument("--bucket", default="bench-s3")
    p.add_argument("--part-mb", type=int, default=16)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--s3fs-path", help="a folder with s3fs installed (pip install --target DIR s3fs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else report(res))


if __name__ == "__main__":
    main()
