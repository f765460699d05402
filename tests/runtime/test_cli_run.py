"""``d4m-infer run``: exit codes, messages and no partial output for bad input; offline, torch-free, batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import infer_testkit as kit
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.reader import read_series_datasets
from d4m.dicom_io.seg_writer import write_seg
from d4m.runtime.cli import app
from d4m.runtime.runners import onnx_cuda_available

runner = CliRunner()
SECRETS = (kit.PATIENT_NAME, kit.PATIENT_ID, kit.ACCESSION, "SECRET")



@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "study"
    kit.write_tiny_study(root, phases=(Phase.NC, Phase.PVP))
    return root


def _invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _shift(index: int, dz: float = 0.0, dy: float = 0.0) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + dy * index, z + dz]

    return change


def _sr(path: Path, study_uid: str) -> None:
    """A Basic Text SR object (no image)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = "SR"
    ds.PatientName = kit.PATIENT_NAME
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- bad input: one case each


def _empty(study: Path, folder: Path) -> None:
    folder.mkdir()


def _no_ct(study: Path, folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "empty.dcm").write_bytes(b"")
    _sr(folder / "report.dcm", generate_uid())


def _two_studies(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder / "a")
    kit.write_tiny_study(folder / "b", phases=(Phase.PVP,))


def _missing_slice(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder)
    _files(folder / "S4")[5].unlink()


def _uneven(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder)
    for path in _files(folder / "S4")[6:]:
        _edit(path, _shift(0, dz=-2.0))


def _tilt(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder)
    for index, path in enumerate(_files(folder / "S2")):
        _edit(path, _shift(index, dy=1.5))


def _mixed_sizes(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder)

    def crop(ds: pydicom.Dataset) -> None:
        ds.PixelData = ds.pixel_array[:38].tobytes()
        ds.Rows = 38

    _edit(_files(folder / "S4")[3], crop)


def _corrupt(study: Path, folder: Path) -> None:
    shutil.copytree(study, folder)
    _edit(_files(folder / "S4")[4], lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))


BAD_INPUTS = {
    "empty folder": (_empty, (), ["expected DICOM CT image files, found an empty folder"]),
    "no CT series": (_no_ct, (), ["expected at least one CT image series, found none among 3 file(s)",
                                  "not a DICOM file (1)", "empty file (1)", "non-image object"]),
    "two studies": (_two_studies, (), ["expected one study (choose one with --study UID), found 2 studies"]),
    "unknown study": (_two_studies, ("--study", "1.2.3.4"), ["--study 1.2.3.4: expected one of the studies"]),
    "missing slice": (_missing_slice, (), ["PVP: series 4", "expected slices every 8 mm, found a gap of 16 mm",
                                           "between S4/004_0007.dcm and S4/004_0005.dcm"]),
    "uneven spacing": (_uneven, (), ["PVP: series 4", "expected uniform slice spacing of 8 mm"]),
    "gantry tilt": (_tilt, (), ["NC: series 2", "found a gantry tilt of"]),
    "mixed sizes": (_mixed_sizes, (), ["PVP: series 4", "expected one image size (rows x columns), found 40x40 in 11",
                                       "38x40 in 1 file(s) (S4/004_0004.dcm)"]),
    "corrupt pixels": (_corrupt, (), ["PVP: S4/004_0005.dcm: expected pixel data that can be decoded"]),
    "bad phase option": (_missing_slice, ("--phase", "XX=4"), ["--phase XX=4: expected PHASE in"]),
    "unknown series": (shutil.copytree, ("--phase", "PVP=77"), ["--phase PVP=77: expected a series number"]),
}


def _squash(text: str) -> str:
    """Text without whitespace: rich wraps long messages at the terminal width."""
    return "".join(text.split())


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_clear_message_and_no_output(case: str, study: Path, bundle: Path,
                                                              tmp_path: Path) -> None:
    build, extra, fragments = BAD_INPUTS[case]
    folder, out = tmp_path / "input", tmp_path / "out"
    build(study, folder)
    result = _invoke("run", folder, "--bundle", bundle, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert _squash(fragment) in _squash(result.output), result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    for secret in SECRETS:
        assert secret not in result.output


def test_bad_bundle_hash_exits_3(study: Path, bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "bundle"
    shutil.copytree(bundle, tampered)
    with (tampered / "segmenter.onnx").open("ab") as fp:
        fp.write(b"\0")
    result = _invoke("run", study, "--bundle", tampered, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert _squash("bundle/segmenter.onnx: expected sha256") in _squash(result.output)
    assert not (tmp_path / "out").exists()
    missing = _invoke("run", study, "--bundle", tmp_path / "nothing", "--out", tmp_path / "out")
    assert missing.exit_code == 3 and _squash("expected a bundle folder or .zip") in _squash(missing.output)


@pytest.mark.skipif(onnx_cuda_available(), reason="ONNX Runtime offers CUDA here: --device cuda would run")
def test_cuda_without_a_gpu_exits_4(study: Path, bundle: Path, tmp_path: Path) -> None:
    result = _invoke("run", study, "--bundle", bundle, "--out", tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 4, result.output
    assert "CUDAExecutionProvider" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_tensorrt_without_an_engine_in_the_bundle_exits_4_with_one_line(study: Path, bundle: Path,
                                                                         tmp_path: Path) -> None:
    result = _invoke("run", study, "--bundle", bundle, "--out", tmp_path / "out", "--device", "tensorrt")
    assert result.exit_code == 4, result.output  # the engine is unavailable; the bundle itself is fine
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "expected a TensorRT engine for 'segmenter'" in errors[0], result.output
    assert "found none in the bundle" in errors[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# --------------------------------------------------------------------------- successful runs


def test_run_offline_skips_junk_picks_the_study_and_prints_no_phi(
    study: Path, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "input"
    shutil.copytree(study, folder / "wanted")
    kit.write_tiny_study(folder / "other", phases=(Phase.PVP,))
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "wanted" / "zero.dcm").write_bytes(b"")
    wanted_uid = str(pydicom.dcmread(_files(folder / "wanted" / "S4")[0]).StudyInstanceUID)
    _sr(folder / "sr" / "report.dcm", wanted_uid)
    scout = kit.tiny_phase_volume(Phase.NC, shape=(2, 40, 40))
    write_ct_series(scout, folder / "scout", CTSeriesMeta(study_uid=wanted_uid, series_number=1,
                                                          description="Topogram 0.6", patient_name=kit.PATIENT_NAME))
    source = read_series_datasets(_files(folder / "wanted" / "S4"))
    write_seg(np.zeros((len(source), 40, 40), np.uint8), source, folder / "old" / "seg.dcm")

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("network access attempted")

    def no_connection(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    result = _invoke("run", folder, "--bundle", bundle, "--out", tmp_path / "out", "--study", wanted_uid,
                     "--seg-format", "labelmap", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "done" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = report["input"]["skipped"]["reasons"]
    assert reasons["not a DICOM file"] == 1 and reasons["empty file"] == 1
    assert reasons["localizer (SeriesDescription names a scout)"] == 2
    assert any(r.startswith("non-image object") and "Segmentation" in r for r in reasons)
    assert any(r.startswith("non-image object") and "SR" in r for r in reasons)
    assert report["input"]["study_uid"] == wanted_uid and report["phases"]["used"] == ["NC", "PVP"]
    assert report["options"]["seg_format"] == "labelmap" and report["options"]["threads"] == 1
    for secret in SECRETS:
        assert secret not in result.output and secret not in json.dumps(report)


def test_batch_runs_every_study_and_reports_failures(study: Path, bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "studies"
    shutil.copytree(study, root / "a_good")
    (root / "b_empty").mkdir()
    out = root / "results"  # inside the batch root: left out of the studies
    result = _invoke("run", root, "--batch", "--bundle", bundle, "--out", out)
    assert result.exit_code == 2, result.output
    assert "2 studies, 1 failed" in result.output
    summary = json.loads((out / "batch.json").read_text())
    assert [(s["folder"], s["ok"], s["exit_code"]) for s in summary["studies"]] == [("a_good", True, 0),
                                                                                   ("b_empty", False, 2)]
    assert (out / "a_good" / "seg.dcm").is_file() and not (out / "b_empty").exists()


def test_runtime_runs_without_torch_and_without_network(study: Path, bundle: Path, tmp_path: Path) -> None:
    """A fresh interpreter where importing torch or monai fails and sockets raise: the run still succeeds."""
    script = (
        "import sys, socket\n"
        "sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        "class NoSocket(socket.socket):\n"
        "    def __init__(self, *a, **k): raise OSError('network access attempted')\n"
        "def refuse(*a, **k): raise OSError('network access attempted')\n"
        "socket.socket = NoSocket; socket.create_connection = refuse\n"
        "from d4m.runtime.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'monai') and sys.modules[m]]\n"
        "    print('HEAVY', loaded)\n"
        "    raise\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", script, "-q", "run", str(study), "--bundle", str(bundle), "--out", str(out),
               "--nifti"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["qc.png", "report.json", "seg.dcm", "seg.nii.gz"]
