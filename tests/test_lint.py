"""The code base stays ruff-clean (configured in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_based_loading_in_library_code():
    pattern = ("torch.load(", "pickle.load", "weights_only=False")
    offenders = []
    for package in ("ckpt", "trainers"):
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path) as f:
                        text = f.read()
                    offenders += [f"{path}: {p}" for p in pattern if p in text]
    assert offenders == [], offenders
