"""The Python examples in docs/extending.md (a user storage class and a user retention rule) run as written."""

from __future__ import annotations

import os
import re

from tests.support.files import REPO

ROOT = REPO
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_extending_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(ROOT, "docs", "extending.md"), encoding="utf-8") as f:
        blocks = _BLOCK.findall(f.read())
    assert len(blocks) >= 3, "docs/extending.md lost its examples"
    namespace: dict = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/extending.md block {i}", "exec"), namespace)
    assert namespace["storage"].bytes_written > 0
    assert [c.step for c in namespace["coord"].checkpoints()] == [100, 300, 400]
