"""The code base stays ruff-clean (configured in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.files import REPO


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# `ckpt import` reads foreign torch.save files (and DCP's byte values): there, and only there, torch.load is called,
# always with weights_only=True.
IMPORTER = os.path.join("ckpt", "cli", "importing.py")


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
                    if os.path.relpath(path, REPO) == IMPORTER:
                        calls = [text[i: text.index(")", i)] for i in range(len(text)) if text.startswith("torch.load(", i)]
                        offenders += [f"{path}: {c})" for c in calls if "weights_only=True" not in c]
                        text = text.replace("torch.load(", "")
                    offenders += [f"{path}: {p}" for p in pattern if p in text]
    assert offenders == [], offenders
