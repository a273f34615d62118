"""docs/retention.md and docs/cli.md show what the code really prints.

Each page is played in order in a temporary working directory:
- a ```python block is saved as a script (as the name in a preceding `<!-- save as: NAME -->`, else a
  numbered file) and run with `python`; the plain ``` block right after it, if any, is its expected output
  (stdout and stderr together, with the `ckpt INFO saved ...` lines left out, as the page says);
- a block of `$ COMMAND` lines is a terminal session: each command runs in bash, a plain `ckpt ...` one in
  this process through `ckpt.cli.main.main` (no torch import per command; the console script itself is tested in
  test_cli.py); `echo $?` prints the last command's status; the lines after a command are its output;
- `<!-- setup: COMMAND -->` runs COMMAND in bash ($REPO is the checkout) without showing it;
- `<!-- not run: WHY -->` skips the next block.
Outputs are compared with times and library versions masked. After changing what the command prints,
regenerate the pages with `CKPT_UPDATE_DOCS=1 python -m pytest tests/ckpt/cli/test_cli_docs.py`, and review the diff.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from ckpt.cli import main
from tests.support.files import REPO

_TOKEN = re.compile(r"<!--\s*(?P<marker>.*?)\s*-->|^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.S | re.M)
_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?"), "<TIME>"),
    (re.compile(r"\b(torch|python|ckpt) \d+\.\d+\.\d+\S*"), r"\1 <VERSION>"),
    (re.compile(r"pid \d+ on host \S+"), "pid <PID> on host <HOST>"),
]
_LEFT_OUT = re.compile(r"^ckpt INFO saved ")


def _mask(text: str) -> str:
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@dataclass
class Played:
    """Each checked block's span in the page and what the code printed for it (for the diff or an update)."""

    page: str
    text: str
    replacements: list[tuple[int, int, str]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def check(self, start: int, end: int, expected: str, actual: str, what: str) -> None:
        self.replacements.append((start, end, actual))
        if _mask(expected) != _mask(actual):
            diff = "\n".join(difflib.unified_diff(_mask(expected).splitlines(), _mask(actual).splitlines(),
                                                  "documented", "actual", lineterm=""))
            self.mismatches.append(f"{self.page}: {what}\n{diff}")

    def updated(self) -> str:
        text = self.text
        for start, end, actual in sorted(self.replacements, reverse=True):
            text = text[:start] + actual.strip("\n") + "\n" + text[end:]
        return text


def _bash(command: str, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def _in_process(command: str, cwd) -> tuple[int, str]:
    captured, before = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            status = main(shlex.split(command)[1:])
    finally:
        os.chdir(before)
    return status, captured.getvalue()


def _session(code: str, cwd, env) -> str:
    """Run a `$ ...` block's commands; the transcript as the page shows it."""
    out, status = [], 0
    for line in code.splitlines():
        if not line.startswith("$ "):
            continue
        command = line[2:]
        out.append(line)
        if command.strip() == "echo $?":
            out.append(str(status))
            continue
        if command.startswith("ckpt ") and not re.search(r"[|&;<>$`]", command):
            status, text = _in_process(command, cwd)
        else:
            proc = _bash(command, cwd, env)
            status, text = proc.returncode, proc.stdout
        out += text.rstrip("\n").splitlines()
    return "\n".join(out) + "\n"


def play(page: str, cwd, check: bool = True) -> Played:
    with open(os.path.join(REPO, "docs", page), encoding="utf-8") as f:
        played = Played(page, f.read())
    env = {**os.environ, "REPO": REPO, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "COLUMNS": "200"}
    env.pop("CKPT_DEBUG", None)
    tokens = list(_TOKEN.finditer(played.text))
    skip, name, i = False, None, 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        marker = tok.group("marker")
        if marker is not None:
            if marker.startswith("not run"):
                skip = True
            elif marker.startswith("save as:"):
                name = marker.split(":", 1)[1].strip()
            elif marker.startswith("setup:"):
                proc = _bash(marker.split(":", 1)[1], cwd, env)
                assert proc.returncode == 0, f"{page}: setup {marker!r} failed:\n{proc.stdout[-3000:]}"
            continue
        if skip:
            skip = False
            continue
        lang, code = tok.group("lang"), tok.group("code")
        if lang == "python":
            script, name = name or f"block_{tok.start()}.py", None
            (cwd / script).write_text(code)
            proc = _bash(f"{sys.executable} {script}", cwd, env)
            assert proc.returncode == 0, f"{page}: {script} failed:\n{proc.stdout[-3000:]}"
            following = tokens[i] if i < len(tokens) else None
            if following is not None and following.group("lang") == "" and not following.group("code").startswith("$"):
                i += 1
                shown = "\n".join(ln for ln in proc.stdout.splitlines() if not _LEFT_OUT.match(ln)) + "\n"
                if check:
                    played.check(following.start("code"), following.end("code"), following.group("code"), shown,
                                 f"the output of {script}")
        elif lang == "" and code.startswith("$ "):
            actual = _session(code, cwd, env)
            if check:
                played.check(tok.start("code"), tok.end("code"), code, actual, code.splitlines()[0])
    return played


def _verify(played: Played) -> None:
    if os.environ.get("CKPT_UPDATE_DOCS"):
        with open(os.path.join(REPO, "docs", played.page), "w", encoding="utf-8") as f:
            f.write(played.updated())
        return
    assert played.replacements, f"no checked examples found in {played.page}"
    assert not played.mismatches, (f"{len(played.mismatches)} examples differ from what the code prints "
                                   "(CKPT_UPDATE_DOCS=1 regenerates them):\n\n" + "\n\n".join(played.mismatches))


def test_retention_doc_shows_what_the_code_prints(tmp_path):
    _verify(play("retention.md", tmp_path))


def test_migration_doc_shows_what_the_code_prints(tmp_path):
    pytest.importorskip("transformers", reason="the Hugging Face examples need transformers (the test extra)")
    _verify(play("migration.md", tmp_path))


@pytest.mark.skipif(sys.platform != "linux", reason="the examples launch a 4-rank gloo job with torchrun")
def test_cli_doc_shows_what_the_command_prints(tmp_path):
    play("retention.md", tmp_path, check=False)  # runs/exp1 comes from retention.md's two scripts
    _verify(play("cli.md", tmp_path))
