"""A real S3 server for tests: moto's ThreadedMotoServer over HTTP on 127.0.0.1 (no mocked client).

`s3_server` (a fixture in tests/conftest.py) starts one per test module and points the standard AWS settings at
it, so ranks spawned by the test inherit them; `s3_run` gives each test a fresh bucket prefix.
"""

from __future__ import annotations

import os
import secrets
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
