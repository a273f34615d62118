"""How S3Storage moves bytes, measured against a real S3 server over HTTP (moto on 127.0.0.1): a file streams
out as a multipart upload whose parts go in parallel, with memory bounded by the part buffers in flight, not by
the file; a read is parallel ranged GETs received straight into the destination buffer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.files import REPO

pytest.importorskip("moto.server")

PART_MB, IN_FLIGHT, TOTAL_MB = 5, 3, 60


def test_uploads_are_parallel_parts_in_bounded_memory_and_reads_are_parallel_ranged_gets(s3_server, s3_run):
    code = ("import json, sys\nfrom tests.support.s3 import probe_transfers\n"
            f"print(json.dumps(probe_transfers(sys.argv[1], {PART_MB}, {IN_FLIGHT}, {TOTAL_MB})))\n")
    proc = subprocess.run([sys.executable, "-c", code, s3_run], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    part = PART_MB << 20
    size = (TOTAL_MB << 20) + 12345
    assert r["written"] == size and r["same"]
    # Uploads: every full part and the short last one, several at once but never more than in_flight.
    assert r["parts"] == -(-size // part)
    assert 2 <= r["parts_at_once"] <= IN_FLIGHT, r
    # The file's 60 MiB never sit in memory: at most in_flight part buffers, plus the short last part's copy.
    assert r["upload_peak"] < (IN_FLIGHT + 1) * part, f"upload peak {r['upload_peak'] / 2**20:.1f} MiB"
    # Reads: one ranged GET per part, several at once, each received into its slice of the destination.
    ranges = sorted(r["gets"], key=lambda g: int(g.split("=")[1].split("-")[0]))
    assert ranges == [f"bytes={at}-{min(at + part, size) - 1}" for at in range(0, size, part)]
    assert 2 <= r["gets_at_once"] <= IN_FLIGHT, r
    assert r["read_peak"] < part, f"read peak {r['read_peak'] / 2**20:.1f} MiB besides the destination"
