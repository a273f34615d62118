"""Two nodes on one machine: two torchrun launchers (--nnodes 2, node rank 0 and 1, c10d rendezvous on
loopback), 2 processes each. DDP, DPxTP and DPxPP (dp across the nodes, tp or pp inside each) train, stop,
and resume bit for bit; each node's local rank 0 writes its PER_NODE state and only global rank 0 writes
GLOBAL state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.distributed import free_port
from tests.support.files import REPO

JOB = os.path.join(REPO, "tests", "e2e", "multinode_job.py")
KINDS = ("ddp", "hybrid", "pp")  # as tests/e2e/multinode_job.py trains them


def _launch_two_nodes(root: str, phase: str) -> list[dict]:
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank",
         str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mn-{phase}",
         JOB, "--root", root, "--phase", phase], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"launcher failed ({p.returncode}):\n{log[-4000:]}"
    out = []
    for rank in range(4):
        with open(os.path.join(root, "out", phase, f"rank-{rank}.json")) as f:
            out.append(json.load(f))
    return out


def _manifest(root: str, kind: str) -> dict:
    with open(os.path.join(root, kind, "straight", "checkpoint-00000008", "checkpoint_manifest.json")) as f:
        return json.load(f)


def test_two_torchrun_launchers_train_save_and_resume(tmp_path):
    root = str(tmp_path)
    first = _launch_two_nodes(root, "first")
    resumed = _launch_two_nodes(root, "resumed")
    local_zero = {r for r, res in enumerate(first) if res["env"]["LOCAL_RANK"] == 0}
    assert {res["env"]["GROUP_RANK"] for res in first} == {0, 1} and len(local_zero) == 2
    for rank in range(4):
        for kind in KINDS:
            straight, stopped, again = first[rank][kind]["straight"], first[rank][kind]["stopped"], resumed[rank][kind]
            assert stopped["step"] == 4 and again["step"] == straight["step"] == 8, (kind, rank)
            assert stopped["losses"] + again["losses"] == straight["losses"], f"{kind} rank {rank}: losses"
            assert again["model"] == straight["model"], f"{kind} rank {rank}: parameters"
            assert again["cache_steps"] == straight["cache_steps"] == 8 and again["job_steps"] == 8
    for kind in KINDS:
        m = _manifest(root, kind)
        assert (m["topology"]["num_nodes"], m["topology"]["local_world_size"]) == (2, 2)
        node = m["components"]["callback.node_cache"]
        assert node["pattern"] == "per_node"
        assert {(f["owner"], f["writer_rank"]) for f in node["files"]} == {(0, 0), (1, 2)}
        assert {f["writer_rank"] for f in node["files"]} == local_zero  # each node's local rank 0
        for key in ("callback.job_counter", *(["data"] if kind == "ddp" else [])):
            assert m["components"][key]["pattern"] == "global"
            assert {f["writer_rank"] for f in m["components"][key]["files"]} == {0}, key
    hybrid = _manifest(root, "hybrid")
    assert hybrid["topology"]["process_groups"] == {"dp": [[0, 2], [1, 3]], "tp": [[0, 1], [2, 3]]}
    # dp x pp: each node holds one whole pipeline (a replica); a stage's copy is shared across the nodes.
    pp = _manifest(root, "pp")
    assert pp["topology"]["process_groups"] == {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]}
    data, model = pp["components"]["data"], pp["components"]["model"]
    assert (data["pattern"], data["process_group"], model["pattern"]) == ("per_group", "pp", "per_group")
    assert data["replica_sets"] == [[0, 1], [2, 3]]  # one sampler per replica, i.e. per node
    assert all(f["writer_rank"] in data["replica_sets"][f["owner"]] for f in data["files"])
    assert {f["writer_rank"] for f in model["files"] if f["kind"] == "tensors"} == {0, 1, 2, 3}
