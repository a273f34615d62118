"""The Python examples in docs/recovery.md run as written (in order, one namespace, a temporary directory),
and the TOML example there is the demo's policy file."""

from __future__ import annotations

import os
import re

from tests.support.files import REPO

PAGE = os.path.join(REPO, "docs", "recovery.md")


def _blocks(lang: str) -> list[str]:
    with open(PAGE, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def test_recovery_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"recovery.md block {i}", "exec"), namespace)


def test_the_documented_policy_file_is_the_demo_one():
    from trainers.demo.faults import DEFAULT_POLICY
    from trainers.recovery import RecoveryPolicy

    documented = tmp = _blocks("toml")[0]
    with open(DEFAULT_POLICY, encoding="utf-8") as f:
        shipped = f.read()
    policy = RecoveryPolicy.from_toml(DEFAULT_POLICY).to_plain()
    assert policy["detector"] == {"per_step": True, "warmup": 20, "smoothing": 0.07, "patience": 15, "threshold": 1.0,
                                  "relative_threshold": 1.5}
    assert policy["rollback_memory_mb"] == 256
    strip = lambda text: [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]  # noqa: E731
    assert strip(documented) == strip(shipped), tmp
