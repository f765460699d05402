"""The bundle ``d4m-export onnx`` writes: the run's constants, labels, golden data, parity, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d4m.dicom_io.codes import LABELS, PHASE_ORDER
from d4m.dicom_io.errors import InputError
from d4m.export.bundle_writer import ExportConfig, load_segmenter_run, write_onnx_bundle
from d4m.export.parity import verify_bundle
from d4m.runtime.bundle import load_bundle
from d4m.runtime.manifest import Precision
from d4m.training.segmenter import SegmenterConfig

#: The fixture run's constants (tests/export/conftest.py).
NORM_MEAN, NORM_STD, SPACING = 104.5, 38.25, (2.8, 2.8, 5.0)


def test_manifest_holds_the_runs_constants(fp16_bundle: Path, segmenter_run: Path) -> None:
    config = SegmenterConfig.load(segmenter_run / "config.json")
    assert (config.norm_mean, config.norm_std, config.spacing) == (NORM_MEAN, NORM_STD, SPACING)
    with load_bundle(fp16_bundle, probe_gpu=False) as bundle:
        manifest = bundle.manifest
        assert manifest.phases == PHASE_ORDER
        pre = manifest.preprocessing
        assert (pre.mean, pre.std, pre.hu_window, pre.target_spacing) == (NORM_MEAN, NORM_STD, (-21.0, 189.0),
                                                                          SPACING)
        assert manifest.sliding_window.patch_size == config.patch_size == (32, 48, 48)
        assert manifest.sliding_window.overlap == config.overlap
        assert manifest.labels == tuple(LABELS.values())
        assert manifest.postprocessing.min_liver_contact == 0.75  # the run's postprocess.json
        assert [(e.file, e.precision) for e in manifest.engines] == [("segmenter.onnx", Precision.FP32),
                                                                     ("segmenter.fp16.onnx", Precision.FP16)]
        assert manifest.engines[0].inputs[0].shape == ("N", 4, "Z", "Y", "X")
        assert [f.file for f in manifest.files] == ["parity.json"]
    labels = json.loads((fp16_bundle / "manifest.json").read_text())["labels"]
    assert labels[1]["property_type"]["value"] == "108369006" and labels[0]["property_type"]["scheme"] == "SCT"


def test_golden_is_a_real_normalised_patch_and_the_torch_output(fp16_bundle: Path, segmenter_run: Path) -> None:
    golden_in = np.load(fp16_bundle / "golden" / "input.npy")
    golden_out = np.load(fp16_bundle / "golden" / "output.npy")
    assert golden_in.shape == (1, 4, 32, 48, 48) and golden_out.shape == (1, 3, 32, 48, 48)
    low, high = (-21.0 - NORM_MEAN) / NORM_STD, (189.0 - NORM_MEAN) / NORM_STD
    assert golden_in.min() >= low - 1e-5 and golden_in.max() <= high + 1e-5  # windowed and z-scored
    assert (golden_in == np.float32(low)).mean() > 0.05  # air outside the body
    assert 0.1 < ((golden_in > low + 0.5) & (golden_in < high - 0.5)).mean()  # soft tissue: a real image
    run = load_segmenter_run(segmenter_run)
    with torch.no_grad():
        again = run.network(torch.from_numpy(golden_in)).numpy()
    np.testing.assert_allclose(golden_out, again, atol=1e-5)
    labels = golden_out.argmax(1)
    assert {1, 2} <= set(np.unique(labels).tolist())  # randomised weights: a mixed label map


def test_parity_report_is_saved_and_passes(fp16_bundle: Path) -> None:
    parity = json.loads((fp16_bundle / "parity.json").read_text())
    assert parity["passed"] is True and parity["schema_version"] == 1
    fp32, fp16 = parity["engines"]
    assert fp32["tolerance"]["atol"] == 1e-4 and fp32["outputs"][0]["max_abs"] <= 1e-4
    assert min(fp32["outputs"][0]["dice"].values()) >= 0.999
    assert 1e-5 < fp16["outputs"][0]["max_abs"] <= 1e-3 + 1e-2 * fp16["outputs"][0]["reference_max"]
    report = verify_bundle(fp16_bundle, "cpu", threads=2)
    assert report.passed and [r.file for r in report.rows] == ["segmenter.onnx", "segmenter.fp16.onnx"]
    assert report.rows[0].comparisons[0].max_abs == pytest.approx(fp32["outputs"][0]["max_abs"], rel=0.5, abs=1e-6)


def test_provenance_without_site_paths(fp16_bundle: Path, segmenter_run: Path) -> None:
    text = (fp16_bundle / "manifest.json").read_text()
    assert str(segmenter_run.parent) not in text and str(fp16_bundle.parent) not in text
    provenance = json.loads(text)["provenance"]
    assert provenance["training"]["filters"] == [8, 16, 32, 64] and provenance["training"]["norm_mean"] == NORM_MEAN
    assert provenance["metrics"]["summary"]["best"]["tumor_dice"] == 0.61
    assert provenance["metrics"]["last_row"]["val_lesion_f1"] is None  # NaN is not JSON
    assert provenance["data"] == {"dataset": "data", "data_fraction": 1.0, "split": [0.6, 0.2, 0.2],
                                  "synthetic_ratio": 0.0, "found": False}
    assert {"d4m", "torch", "onnx", "onnxruntime", "python"} <= set(provenance["versions"])
    assert provenance["export"]["fp16"] is True and provenance["export"]["stage"] == "export"


def test_run_without_measured_constants_is_refused(tmp_path: Path) -> None:
    from d4m.training.segmenter import segmenter_preset

    folder = tmp_path / "run"
    folder.mkdir()
    segmenter_preset("tiny").save(folder / "config.json")
    with pytest.raises(InputError, match=r"config\.json: expected measured norm_mean/norm_std and spacing"):
        write_onnx_bundle(ExportConfig(run=folder, out=tmp_path / "bundle"))
    with pytest.raises(InputError, match=r"expected the config\.json of a segmenter run, found nothing"):
        write_onnx_bundle(ExportConfig(run=tmp_path / "nothing", out=tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()


def test_existing_bundle_needs_overwrite(fp16_bundle: Path, segmenter_run: Path) -> None:
    with pytest.raises(InputError, match="expected a new output folder, found an existing one"):
        write_onnx_bundle(ExportConfig(run=segmenter_run, out=fp16_bundle))


def test_export_config_validates() -> None:
    with pytest.raises(InputError, match="expected opset in 14..20, found 9"):
        ExportConfig(opset=9)
    with pytest.raises(InputError, match="expected inpainter_size"):
        ExportConfig(inpainter_size=(8, 512))


@pytest.mark.slow
def test_bundle_with_synthesizer(segmenter_run: Path, synthesis_runs: tuple[Path, Path, Path],
                                 tmp_path: Path) -> None:
    out = write_onnx_bundle(ExportConfig(run=segmenter_run, out=tmp_path / "bundle", synthesizer=synthesis_runs,
                                         inpainter_size=(64, 64), study_parity=True))
    with load_bundle(out, probe_gpu=False) as bundle:
        names = [(e.name, e.file) for e in bundle.manifest.engines]
        files = [f.file for f in bundle.manifest.files]
    assert names[1:] == [("inpainter", "synthesizer/inpainter.onnx"), ("encoder", "synthesizer/encoder.onnx"),
                         ("decoder", "synthesizer/decoder.onnx"), ("denoiser", "synthesizer/denoiser.onnx")]
    assert "golden/denoiser.npz" in files and "synthesizer/synthesizer.json" in files
    settings = json.loads((out / "synthesizer" / "synthesizer.json").read_text())
    assert settings["inpainter"]["size"] == [64, 64] and settings["ldm"]["latent_crop"] == [8, 8, 8]
    with np.load(out / "golden" / "denoiser.npz") as data:
        assert data["input.timesteps"].dtype == np.int64 and data["input.phase_index"].tolist() == [2]
    parity = json.loads((out / "parity.json").read_text())
    assert all(o["max_abs"] <= 1e-4 for r in parity["engines"] for o in r["outputs"])
    assert min(parity["study"]["dice"].values()) >= 0.999
    assert verify_bundle(out, "cpu").passed
