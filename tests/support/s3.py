"""A real S3 server for tests: moto's ThreadedMotoServer over HTTP on 127.0.0.1 (no mocked client).

`s3_server` (a fixture in tests/conftest.py) starts one per test module and points the standard AWS settings at
it, so ranks spawned by the test inherit them; `s3_run` gives each test a fresh bucket prefix.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import tracemalloc
from dataclasses import dataclass

import pytest

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "ckpt-tests"


@dataclass
class S3Server:
    """A running server: its endpoint, and a boto3 client for looking at what the code under test wrote."""

    server: object
    endpoint: str
    client: object

    def keys(self, url: str) -> list[str]:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1:] for p in pages for o in p.get("Contents", []))

    def uploads(self, url: str) -> list[str]:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        resp = self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/")
        return sorted(u["Key"] for u in resp.get("Uploads", []))


def start_server() -> S3Server:
    pytest.importorskip("boto3", reason="the S3 tests need the ckpt[s3] extra")
    server_mod = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the test extra)")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS_ENV.items()
                                                         if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return S3Server(server, endpoint, client)


def set_env(endpoint: str) -> dict[str, str | None]:
    """Point the AWS settings at `endpoint`; returns what to restore."""
    new = {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def fresh_url() -> str:
    return f"s3://{BUCKET}/run-{secrets.token_hex(4)}"


def killing_storage(part_mb: int = 5, lease_s: float = 60.0, after_bytes: int = 12 << 20, match: str = ""):
    """An S3Storage whose process SIGKILLs itself once a file matching `match` has streamed `after_bytes`
    into its upload (parts are in flight: a real mid-upload death)."""
    from ckpt.io.s3 import S3Options, S3Storage

    class KillMidUpload(S3Storage):
        def write_file(self, path, chunks):
            if match not in path:
                return super().write_file(path, chunks)

            def feed():
                sent = 0
                for chunk in chunks:
                    yield chunk
                    sent += len(memoryview(chunk).cast("B"))
                    if sent >= after_bytes:
                        os.kill(os.getpid(), 9)
                        time.sleep(60)
            return super().write_file(path, feed())

    return KillMidUpload(S3Options(part_bytes=part_mb << 20, lock_lease_s=lease_s))


def gated_storage(marker_dir: str, match: str):
    """An S3Storage that, before writing a file matching `match`, says so (a file `ready-<pid>` in
    `marker_dir`) and waits until `marker_dir/go` exists: the test stops the server in between."""
    from ckpt.io.s3 import S3Options, S3Storage

    class Gated(S3Storage):
        def write_file(self, path, chunks):
            if match in path:
                open(os.path.join(marker_dir, f"ready-{os.getpid()}"), "w").close()
                while not os.path.exists(os.path.join(marker_dir, "go")):
                    time.sleep(0.05)
            return super().write_file(path, chunks)

    return Gated(S3Options(max_attempts=2, timeout_s=5))


class Overlap:
    """Counts requests of one kind in flight at once (botocore's own event hooks on a real client, no mock).
    The first request waits, up to `wait_s`, for a second to start: requests sent one after another can then
    never overlap, while parallel ones always do."""

    def __init__(self, events, operation: str, wait_s: float = 60.0):
        self.lock, self.second = threading.Lock(), threading.Event()
        self.active = self.most = self.count = 0
        self.params: list[dict] = []
        self.wait_s = wait_s
        events.register(f"provide-client-params.s3.{operation}", self._params)
        events.register(f"before-send.s3.{operation}", self._start)
        events.register(f"after-call.s3.{operation}", self._end)

    def _params(self, params, **kwargs):
        with self.lock:
            self.params.append(dict(params, Body=None))

    def _start(self, **kwargs):
        with self.lock:
            self.active += 1
            self.count += 1
            self.most = max(self.most, self.active)
            first = self.count == 1
            if self.count == 2:
                self.second.set()
        if first:
            self.second.wait(self.wait_s)

    def _end(self, **kwargs):
        with self.lock:
            self.active -= 1


def probe_transfers(url: str, part_mb: int, in_flight: int, total_mb: int) -> dict:
    """Upload `total_mb` MiB through S3Storage.write_file from a stream of 1 MiB chunks, then read it back into
    one buffer; what the client did and the peak of Python-allocated memory during each (run it in a process of
    its own, with the server in another, so the server's copies are not counted)."""
    from ckpt.io.s3 import S3Options, S3Storage

    storage = S3Storage(S3Options(part_bytes=part_mb << 20, in_flight=in_flight))
    ups = Overlap(storage.client.meta.events, "UploadPart")
    gets = Overlap(storage.client.meta.events, "GetObject")
    tail = 12345  # the last part is a short one

    def chunks():
        for i in range(total_mb):
            yield bytes([i % 251]) * (1 << 20)
        yield b"\xee" * tail

    path = f"{url}/big.bin"
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    written = storage.write_file(path, chunks())
    upload_peak = tracemalloc.get_traced_memory()[1] - base
    into = bytearray(written)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with storage.open_read(path) as f:
        got = f.readinto(into)
    read_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    view = memoryview(into)
    same = got == written and all(view[i << 20: (i + 1) << 20] == bytes([i % 251]) * (1 << 20)
                                  for i in range(total_mb)) and view[total_mb << 20:] == b"\xee" * tail
    return {"written": written, "upload_peak": upload_peak, "read_peak": read_peak, "parts": ups.count,
            "parts_at_once": ups.most, "gets": [p.get("Range") for p in gets.params], "gets_at_once": gets.most,
            "same": same}
