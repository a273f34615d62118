"""The Python examples in docs/user_guide.md and docs/trainer_authors.md run as written.

Blocks of one page run in order in one namespace, in a temporary working directory. A block preceded by
`<!-- run under torchrun: N -->` is saved as a script and launched with N ranks; one preceded by
`<!-- not run: ... -->` is skipped (the marker says why).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.files import REPO

_BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks(page: str) -> list[tuple[str, str]]:
    with open(os.path.join(REPO, "docs", page), encoding="utf-8") as f:
        return [(m.group("marker") or "", m.group("code")) for m in _BLOCK.finditer(f.read())]


@pytest.mark.parametrize("page", ["user_guide.md", "trainer_authors.md"])
def test_doc_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(page)
    assert blocks, f"no python examples found in {page}"
    namespace: dict = {"__name__": "__doc_example__"}
    for i, (marker, code) in enumerate(blocks):
        if marker.startswith("not run"):
            compile(code, f"{page} block {i}", "exec")  # still valid Python
            continue
        launch = re.match(r"run under torchrun: (\d+)", marker)
        if launch:
            script = tmp_path / f"example_{i}.py"
            script.write_text(code)
            env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   launch.group(1), str(script)], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=240)
            assert proc.returncode == 0, f"{page} block {i} failed under torchrun:\n{proc.stderr[-4000:]}"
            continue
        exec(compile(code, f"{page} block {i}", "exec"), namespace)
