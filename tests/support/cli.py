"""Running the `ckpt` command in-process, as the CLI tests do."""

from __future__ import annotations

import json

from ckpt.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`ckpt ARGV...` in this process: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv: str) -> tuple[int, dict]:
    """`ckpt ARGV... --json`: its exit code and parsed output."""
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)
