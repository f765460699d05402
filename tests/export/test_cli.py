"""``d4m-export``: onnx, verify, inspect and tensorrt, with their exit codes and messages."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from d4m.export.cli import app
from d4m.runtime.bundle import file_ref, sha256_file, write_manifest
from d4m.runtime.manifest import Golden, Manifest

runner = CliRunner()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables and messages on one line each, whatever the terminal."""
    from d4m.runtime import console

    monkeypatch.setattr(console.stdout, "width", 250)
    monkeypatch.setattr(console.stderr, "width", 250)


@pytest.fixture
def bundle_copy(fp16_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle, free to tamper with."""
    return Path(shutil.copytree(fp16_bundle, tmp_path / "bundle"))


def _edit_manifest(folder: Path, change) -> None:  # noqa: ANN001
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_version_and_help() -> None:
    assert runner.invoke(app, ["--version"]).stdout.startswith("d4m ")
    result = runner.invoke(app, [])
    assert "onnx" in result.stdout and "verify" in result.stdout and "tensorrt" in result.stdout


def test_verify_passes_with_a_table(fp16_bundle: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", "--bundle", str(fp16_bundle), "--threads", "2",
                                 "--json", str(tmp_path / "verify.json")], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("segmenter.onnx", "segmenter.fp16.onnx", "CPU", "pass", "max |err|", "argmax Dice"):
        assert text in result.stdout
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] is True and report["sha256"] == sha256_file(fp16_bundle / "manifest.json")


def test_verify_tampered_file_exits_3(bundle_copy: Path) -> None:
    expected = sha256_file(bundle_copy / "segmenter.fp16.onnx")
    with (bundle_copy / "segmenter.fp16.onnx").open("ab") as handle:
        handle.write(b"\0")
    result = runner.invoke(app, ["verify", "--bundle", str(bundle_copy)], terminal_width=300)
    assert result.exit_code == 3
    assert f"segmenter.fp16.onnx: expected sha256 {expected}, found" in " ".join(result.output.split())


def test_verify_missing_engine_file_exits_3(bundle_copy: Path) -> None:
    (bundle_copy / "segmenter.onnx").unlink()
    result = runner.invoke(app, ["verify", "--bundle", str(bundle_copy)], terminal_width=300)
    assert result.exit_code == 3
    assert "segmenter.onnx: expected the file listed in manifest.json" in " ".join(result.output.split())


def test_verify_without_an_engine_for_the_device_exits_4(fp16_bundle: Path) -> None:
    result = runner.invoke(app, ["verify", "--bundle", str(fp16_bundle), "--device", "tensorrt"], terminal_width=300)
    assert result.exit_code == 4
    assert "expected a tensorrt engine to verify on tensorrt, found ['segmenter.onnx', 'segmenter.fp16.onnx']" in \
        " ".join(result.output.split())


def test_verify_on_cuda_without_the_provider_exits_4(fp16_bundle: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    result = runner.invoke(app, ["verify", "--bundle", str(fp16_bundle), "--device", "cuda"], terminal_width=300)
    assert result.exit_code == 4
    assert "expected ONNX Runtime with CUDAExecutionProvider" in " ".join(result.output.split())


def test_verify_wrong_schema_version_exits_3(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=99))
    result = runner.invoke(app, ["verify", "--bundle", str(bundle_copy)], terminal_width=300)
    assert result.exit_code == 3
    assert "manifest.json: expected schema_version 1, found 99" in " ".join(result.output.split())


def test_verify_parity_gate_failure_exits_1(bundle_copy: Path) -> None:
    golden = bundle_copy / "golden" / "output.npy"
    np.save(golden, np.load(golden) + 0.01)  # a reference no engine matches within 1e-4 ...
    manifest = Manifest.from_dict(json.loads((bundle_copy / "manifest.json").read_text()))
    assert manifest.golden is not None
    resigned = dataclasses.replace(manifest, golden=Golden(manifest.golden.input, file_ref(bundle_copy,
                                                                                          "golden/output.npy")))
    write_manifest(bundle_copy, resigned)  # ... in an intact, re-signed bundle
    result = runner.invoke(app, ["verify", "--bundle", str(bundle_copy)], terminal_width=300)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "FAIL" in text and "segmenter.onnx (CPUExecutionProvider) output 'logits': expected max |error| <=" in text
    assert "segmenter.fp16.onnx" in text.split("error (ParityError)")[0]  # FP16 still passes: 0.01 is inside its gate


def test_inspect_prints_the_manifest(fp16_bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(fp16_bundle)], terminal_width=250)
    assert result.exit_code == 0, result.output
    for text in ("-21 .. 189", "mean 104.5, std 38.25", "2.8 × 2.8 × 5 mm", "32 × 48 × 48", "SCT 108369006",
                 "segmenter.fp16.onnx", "opset 17", "dynunet [8, 16, 32, 64]", "tumor_dice 0.61"):
        assert text in result.stdout, text
    as_json = runner.invoke(app, ["inspect", str(fp16_bundle), "--json"])
    data = json.loads(as_json.stdout)
    assert data["schema_version"] == 1 and data["usable"]["engines"][0]["usable"] is True


def test_inspect_tampered_bundle_exits_3(bundle_copy: Path) -> None:
    (bundle_copy / "parity.json").write_text("{}")
    result = runner.invoke(app, ["inspect", str(bundle_copy)], terminal_width=300)
    assert result.exit_code == 3 and "parity.json: expected sha256" in " ".join(result.output.split())


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the unavailable path cannot be shown")
def test_tensorrt_without_tensorrt_exits_4_with_one_line(fp16_bundle: Path) -> None:
    result = runner.invoke(app, ["tensorrt", "--bundle", str(fp16_bundle), "--fp16"], terminal_width=400)
    assert result.exit_code == 4
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # no progress bar, no traceback
    assert "TensorRT engine builds: expected the optional dependency 'tensorrt' (pip install 'd4m[gpu]')" in lines[0]


def test_onnx_command_fixed_patch(segmenter_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    result = runner.invoke(app, ["-q", "onnx", "--run", str(segmenter_run), "--out", str(out), "--fixed-patch",
                                 "--native-instance-norm"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"][0]["inputs"][0]["shape"] == ["N", 4, 32, 48, 48]
    assert manifest["provenance"]["export"]["precise_norm"] is False
    again = runner.invoke(app, ["onnx", "--run", str(segmenter_run), "--out", str(out)])
    assert again.exit_code == 2 and "found an existing one" in " ".join(again.output.split())


def test_onnx_command_refuses_a_missing_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["onnx", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2  # Typer checks the path at the edge
