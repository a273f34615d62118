"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from tests.support.s3 import S3Server, fresh_url, restore_env, set_env, start_server


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 server over HTTP on 127.0.0.1 (moto), with the AWS settings pointing at it."""
    server = start_server()
    old = set_env(server.endpoint)
    try:
        yield server
    finally:
        restore_env(old)
        server.server.stop()


@pytest.fixture
def s3_run(s3_server: S3Server) -> str:
    """A fresh `s3://bucket/prefix` run dir on the test server."""
    return fresh_url()
