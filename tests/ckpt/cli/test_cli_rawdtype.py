"""`ckpt inspect`, `diff` and `export` on tensors stored as raw bytes (dtypes safetensors lacks): shown and
compared in their real dtype and shape, exported in a documented lossless form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support.cli import run_cli
from tests.support.workers import Box

C128 = torch.arange(12, dtype=torch.float64).reshape(3, 4) * (1 - 2j)
E8M0 = torch.tensor([1.0, 2.0, 4.0, 0.5, 8.0]).to(torch.float8_e8m0fnu)
C32 = torch.tensor([1 + 2j, -0.5 + 0.25j], dtype=torch.complex64).to(torch.complex32)
BITS = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8).view(torch.bits8)


def _state(**changes: torch.Tensor) -> dict:
    state = {"c128": C128.clone(), "e8m0": E8M0.clone(), "c32": C32.clone(), "bits": BITS.clone(),
             "w": torch.ones(2), "nested": [{"z": C128[0].clone()}], "n": 3}
    state.update(changes)
    return state


def _save(run_dir, step: int, state: dict) -> str:
    CheckpointCoordinator(run_dir).save(step, [StateComponent("m", Box(state), SharingPattern.GLOBAL)])
    return str(run_dir / f"checkpoint-{step:08d}")


@pytest.fixture
def ckpt_dir(tmp_path) -> str:
    return _save(tmp_path, 1, _state())


def test_inspect_shows_the_real_dtype_and_shape(ckpt_dir, capsys):
    code, out, _ = run_cli(capsys, "inspect", ckpt_dir, "--tensors", "--json")
    rows = {t["name"]: t for t in json.loads(out)["tensor_list"]}
    assert code == 0
    assert (rows["c128"]["dtype"], rows["c128"]["shape"], rows["c128"]["stored_as"]) == (
        "complex128", [3, 4], "uint8[3, 4, 16]")
    assert (rows["e8m0"]["dtype"], rows["e8m0"]["shape"]) == ("float8_e8m0fnu", [5])
    assert (rows["c32"]["dtype"], rows["c32"]["shape"]) == ("complex32", [2])
    assert (rows["bits"]["dtype"], rows["bits"]["shape"]) == ("bits8", [2, 2])
    assert (rows["nested/0/z"]["dtype"], rows["nested/0/z"]["shape"]) == ("complex128", [4])
    assert (rows["w"]["dtype"], rows["w"]["shape"], rows["w"]["stored_as"]) == ("float32", [2], None)
    code, out, _ = run_cli(capsys, "inspect", ckpt_dir, "--tensors")
    line = next(x for x in out.splitlines() if " c128 " in x)
    assert code == 0 and "complex128" in line and "[3, 4]" in line and "uint8" not in line


def test_inspect_shows_the_stored_form_when_the_skeleton_is_gone(ckpt_dir, capsys):
    # inspect reads the manifest only; a damaged copy must not stop it (`verify` reports the damage).
    next(Path(ckpt_dir, "m").glob("*.msgpack")).unlink()
    code, out, _ = run_cli(capsys, "inspect", ckpt_dir, "--tensors", "--json")
    rows = {t["name"]: t for t in json.loads(out)["tensor_list"]}
    assert code == 0 and (rows["c128"]["dtype"], rows["c128"]["shape"]) == ("uint8", [3, 4, 16])


def test_diff_compares_raw_tensors_by_value(tmp_path, capsys):
    c128 = C128.clone()
    c128[1, 2] += 3 + 4j  # |3+4j| = 5; a byte-wise comparison would report something else entirely
    e8m0 = torch.tensor([1.0, 2.0, 4.0, 0.5, 2.0]).to(torch.float8_e8m0fnu)  # 8 -> 2
    bits = torch.tensor([[1, 2], [3, 9]], dtype=torch.uint8).view(torch.bits8)
    a = _save(tmp_path, 1, _state())
    b = _save(tmp_path, 2, _state(c128=c128, e8m0=e8m0, bits=bits, c32=torch.zeros(2, dtype=torch.float32)))
    code, out, _ = run_cli(capsys, "diff", a, b, "--json")
    rows = {t["name"]: t for t in json.loads(out)["components"][0]["tensors"]}
    assert code == 1
    assert rows["c128"]["status"] == "changed" and rows["c128"]["max_abs_diff"] == 5.0
    assert rows["e8m0"]["status"] == "changed" and rows["e8m0"]["max_abs_diff"] == 6.0
    assert rows["bits"]["status"] == "changed" and rows["bits"]["differing_elements"] == 1
    assert (rows["c32"]["status"], rows["c32"]["a"], rows["c32"]["b"]) == ("dtype changed", "complex32[2]",
                                                                           "float32[2]")
    assert rows["nested/0/z"]["status"] == "same" and rows["w"]["status"] == "same"
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1 and "max |a-b| = 5" in out and "max |a-b| = 6" in out and "bits8[2, 2]" in out
    assert "complex32[2] -> float32[2]" in out
    assert run_cli(capsys, "diff", a, a)[0] == 0


def test_export_writes_a_documented_lossless_form(ckpt_dir, tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    code, text, _ = run_cli(capsys, "export", ckpt_dir, "--component", "m", "-o", out, "--json")
    result = json.loads(text)
    expected = {"c128": {"dtype": "complex128", "encoding": "real_imag"},
                "nested/0/z": {"dtype": "complex128", "encoding": "real_imag"},
                "c32": {"dtype": "complex32", "encoding": "real_imag"},
                "e8m0": {"dtype": "float8_e8m0fnu", "encoding": "raw_bytes"},
                "bits": {"dtype": "bits8", "encoding": "raw_bytes"}}
    assert code == 0 and result["encoded_dtypes"] == expected and result["left_out_non_tensor"] == ["n"]
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()["ckpt.encoded_dtypes"]) == expected
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert got["c128"].dtype == torch.float64 and list(got["c128"].shape) == [3, 4, 2]
    assert torch.equal(torch.view_as_complex(got["c128"]), C128)
    assert torch.equal(torch.view_as_complex(got["nested/0/z"]), C128[0])
    assert got["c32"].dtype == torch.float16
    assert torch.equal(torch.view_as_real(C32), got["c32"])
    assert got["e8m0"].dtype == torch.uint8 and list(got["e8m0"].shape) == [5, 1]
    assert torch.equal(got["e8m0"].view(torch.float8_e8m0fnu).squeeze(-1).view(torch.uint8), E8M0.view(torch.uint8))
    assert torch.equal(got["bits"].view(torch.bits8).squeeze(-1).view(torch.uint8), BITS.view(torch.uint8))
    assert torch.equal(got["w"], torch.ones(2))
    code, text, _ = run_cli(capsys, "export", ckpt_dir, "--component", "m", "-o", out)  # the plain-text report says so
    assert code == 0 and "encoded 5 tensors whose dtype safetensors lacks" in text and "c128 complex128 -> real_imag" in text


def test_export_of_native_dtypes_records_no_encoding(tmp_path, capsys):
    ck = _save(tmp_path, 1, {"w": torch.ones(2)})
    out = str(tmp_path / "w.safetensors")
    code, text, _ = run_cli(capsys, "export", ck, "--component", "m", "-o", out, "--json")
    assert code == 0 and json.loads(text)["encoded_dtypes"] == {}
    with safe_open(out, framework="pt") as f:
        assert "ckpt.encoded_dtypes" not in f.metadata()
