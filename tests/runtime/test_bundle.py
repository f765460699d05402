"""The bundle contract: strict manifest, hashes, schema version, zip safety, engine usability."""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import LABELS, Phase
from d4m.dicom_io.errors import BundleError, EngineError
from d4m.runtime.bundle import file_ref, load_bundle, sha256_file, write_manifest
from d4m.runtime.manifest import (
    SCHEMA_VERSION,
    EngineEntry,
    Golden,
    Manifest,
    Precision,
    Preprocessing,
    SlidingWindow,
    TensorEntry,
)
from d4m.runtime.postprocess import PostprocessSettings
from d4m.runtime.runners import EngineKind, GpuEnvironment, OnnxRuntimeRunner
from d4m.runtime.sliding_window import BlendMode

H100 = GpuEnvironment("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
IO_IN = (TensorEntry("image", ("N", 4, 8, 8, 8)),)
IO_OUT = (TensorEntry("scores", ("N", 3, 8, 8, 8)),)


def _conv_model(path: Path) -> None:
    """A 3D conv 4 → 3 channels (the segmenter's shape) as ONNX; dummy bytes when onnx is absent."""
    try:
        import onnx
    except ImportError:
        path.write_bytes(b"dummy onnx")
        return
    h, nh = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [h.make_node("Conv", ["image", "w", "b"], ["scores"], kernel_shape=[3, 3, 3], pads=[1] * 6)], "seg",
        [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 4, 8, 8, 8])],
        [h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 3, 8, 8, 8])],
        [nh.from_array(rng.standard_normal((3, 4, 3, 3, 3)).astype(np.float32), "w"),
         nh.from_array(np.zeros(3, np.float32), "b")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)


def make_bundle(folder: Path) -> Manifest:
    """A complete bundle folder: ONNX + TensorRT engines, golden pair, parity report, manifest."""
    folder.mkdir(parents=True)
    _conv_model(folder / "segmenter.onnx")
    (folder / "segmenter.h100.fp16.plan").write_bytes(b"serialized engine")
    (folder / "golden").mkdir()
    np.save(folder / "golden" / "input.npy", np.zeros((1, 4, 8, 8, 8), np.float32))
    np.save(folder / "golden" / "output.npy", np.zeros((1, 3, 8, 8, 8), np.float32))
    (folder / "parity.json").write_text('{"max_abs": 1e-6}')
    onnx_entry = EngineEntry("segmenter", "segmenter.onnx", EngineKind.ONNX, Precision.FP32, IO_IN, IO_OUT,
                             sha256_file(folder / "segmenter.onnx"), opset=17)
    plan = file_ref(folder, "segmenter.h100.fp16.plan")
    trt_entry = EngineEntry("segmenter", plan.file, "tensorrt", "fp16", IO_IN, IO_OUT, plan.sha256,
                            gpu_name=H100.gpu_name, compute_capability="9.0", tensorrt_version="10.3.0")
    manifest = Manifest(
        phases=(Phase.NC, Phase.ART, Phase.PVP, Phase.DEL),
        preprocessing=Preprocessing((-21.0, 189.0), 95.5, 40.25, (0.8, 0.8, 2.5)),
        sliding_window=SlidingWindow((8, 8, 8), overlap=0.5, mode=BlendMode.GAUSSIAN, sigma_scale=0.125),
        engines=(onnx_entry, trt_entry),
        postprocessing=PostprocessSettings(largest_liver=True, fill_holes=True, min_tumor_voxels=10),
        golden=Golden(file_ref(folder, "golden/input.npy"), file_ref(folder, "golden/output.npy")),
        files=(file_ref(folder, "parity.json"),),
        provenance={"training": {"epochs": 3}, "metrics": {"tumor_dice": 0.79}, "versions": {"d4m": "0.1.0"}},
    )
    write_manifest(folder, manifest)
    return manifest


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    make_bundle(tmp_path / "bundle")
    return tmp_path / "bundle"


def _edit_manifest(folder: Path, change) -> None:  # noqa: ANN001
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(tmp_path: Path) -> None:
    written = make_bundle(tmp_path / "b")
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert next(iter(data)) == "schema_version" and data["schema_version"] == SCHEMA_VERSION
    assert data["labels"][1]["property_type"] == {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
    assert "tensorrt_version" not in data["engines"][0] and data["engines"][1]["tensorrt_version"] == "10.3.0"
    with load_bundle(tmp_path / "b", probe_gpu=False) as bundle:
        assert bundle.manifest == written
        assert bundle.manifest.labels == tuple(LABELS.values())
        assert bundle.manifest.preprocessing.normalization.std == 40.25
        assert bundle.sha256 == sha256_file(tmp_path / "b" / "manifest.json")
        assert bundle.engine("onnx").file == "segmenter.onnx"
        assert [s.usable for s in bundle.status] == [True, False]
        assert "no TensorRT/cuda-python or no GPU" in bundle.status[1].reason
        assert bundle.describe()["engines"][1]["usable"] is False


def test_tensorrt_engine_usable_only_on_its_gpu_and_version(bundle_dir: Path) -> None:
    with load_bundle(bundle_dir, environment=H100) as bundle:
        assert bundle.engine(EngineKind.TENSORRT).file == "segmenter.h100.fp16.plan"
        assert bundle.select("auto")[1].format == EngineKind.TENSORRT
    other = GpuEnvironment("10.5.0", "NVIDIA A10", "8.6")
    with load_bundle(bundle_dir, environment=other) as bundle:  # not an error at load time
        with pytest.raises(EngineError, match=re.escape(
                "segmenter.h100.fp16.plan: expected TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 (compute 9.0), "
                "found TensorRT 10.5.0 on NVIDIA A10 (compute 8.6)")):
            bundle.engine("tensorrt")
        assert bundle.select("auto")[1].format == EngineKind.ONNX  # auto falls back to ONNX
        with pytest.raises(BundleError, match="expected a tensorrt engine for 'segmenter' in fp32"):
            bundle.engine("tensorrt", precision="fp32")


def test_tampered_file_names_file_and_expected_hash(bundle_dir: Path) -> None:
    expected = sha256_file(bundle_dir / "segmenter.onnx")
    with (bundle_dir / "segmenter.onnx").open("ab") as fp:
        fp.write(b"\0")
    with pytest.raises(BundleError, match=rf"segmenter\.onnx: expected sha256 {expected}, found [0-9a-f]{{64}}"):
        load_bundle(bundle_dir, probe_gpu=False)


def test_missing_file(bundle_dir: Path) -> None:
    expected = sha256_file(bundle_dir / "golden" / "output.npy")
    (bundle_dir / "golden" / "output.npy").unlink()
    with pytest.raises(BundleError, match=rf"golden/output\.npy: expected the file listed in manifest\.json "
                                          rf"\(sha256 {expected}\), found nothing"):
        load_bundle(bundle_dir, probe_gpu=False)


def test_wrong_schema_version(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=2))
    with pytest.raises(BundleError, match=r"bundle/manifest\.json: expected schema_version 1, found 2"):
        load_bundle(bundle_dir, probe_gpu=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(extra=1), r"expected only the keys .* in the manifest, found unknown \['extra'\]"),
    (lambda d: d["engines"][0].update(speed="fast"), r"in engines\[0\], found unknown \['speed'\]"),
    (lambda d: d["preprocessing"].pop("std"), r"expected the keys \['std'\] in preprocessing, found them missing"),
    (lambda d: d["sliding_window"].update(overlap=1.5), r"expected overlap in \[0, 1\), found 1.5"),
    (lambda d: d["engines"][0].update(file="../segmenter.onnx"), r"expected a relative path inside the bundle"),
    (lambda d: d["engines"][1].pop("gpu_name"), r"expected \['gpu_name'\] for a TensorRT engine"),
    (lambda d: d.update(phases=["NC", "NC"]), r"expected distinct phases"),
    (lambda d: d["postprocessing"].update(min_tumor_voxels="10"), r"postprocessing.min_tumor_voxels as an integer"),
    (lambda d: d["postprocessing"].update(min_liver_contact=2), r"expected min_liver_contact in \[0, 1\], found 2"),
])  # fmt: skip
def test_invalid_manifests_are_refused(bundle_dir: Path, change, message: str) -> None:  # noqa: ANN001
    _edit_manifest(bundle_dir, change)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bundle_dir, probe_gpu=False)
    assert "manifest.json" in str(info.value)


def test_a_manifest_without_the_liver_contact_rule_keeps_its_behaviour(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d["postprocessing"].pop("min_liver_contact"))
    with load_bundle(bundle_dir, probe_gpu=False) as bundle:
        assert bundle.manifest.postprocessing.min_liver_contact == 0.0


def test_segmenter_shape_must_fit_phases_and_labels() -> None:
    bad = (TensorEntry("image", ("N", 3, 8, 8, 8)),)
    entry = EngineEntry("segmenter", "s.onnx", "onnx", "fp32", bad, IO_OUT, "0" * 64)
    with pytest.raises(BundleError, match=r"s\.onnx: expected the segmenter's first input as \(N, 4, z, y, x\)"):
        Manifest(tuple(Phase), Preprocessing((-21, 189), 0, 1, (1, 1, 1)), SlidingWindow((8, 8, 8)), (entry,))


def test_write_manifest_checks_the_files(tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "b")
    (tmp_path / "b" / "parity.json").write_text("{}")
    with pytest.raises(BundleError, match=r"parity\.json: expected sha256"):
        write_manifest(tmp_path / "b", manifest)


def test_zip_bundle(tmp_path: Path, bundle_dir: Path) -> None:
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(bundle_dir.rglob("*")):
            zf.write(path, Path("bundle") / path.relative_to(bundle_dir))  # one top-level folder
    with load_bundle(archive, probe_gpu=False) as bundle:
        root = bundle.root
        assert root.is_dir() and bundle.path("golden/input.npy").is_file()
        assert bundle.sha256 == sha256_file(bundle_dir / "manifest.json")  # same identity zipped or not
    assert not root.exists()  # the temporary copy is removed


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "golden/../../evil.txt", "C:/evil.txt"])
def test_zip_path_traversal_refused(tmp_path: Path, bundle_dir: Path, member: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(bundle_dir.rglob("*")):
            zf.write(path, path.relative_to(bundle_dir))
        zf.writestr(member, "pwned")
    message = rf"evil\.zip: expected members inside the bundle, found '{re.escape(member)}'"
    with pytest.raises(BundleError, match=message):
        load_bundle(archive, probe_gpu=False)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_refused(tmp_path: Path, bundle_dir: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(bundle_dir / "manifest.json", "manifest.json")
        info = zipfile.ZipInfo("segmenter.onnx")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BundleError, match="expected plain files, found the symbolic link 'segmenter.onnx'"):
        load_bundle(archive, probe_gpu=False)


def test_symlink_leaving_a_folder_bundle_refused(tmp_path: Path, bundle_dir: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"max_abs": 1e-6}')
    (bundle_dir / "parity.json").unlink()
    os.symlink(outside, bundle_dir / "parity.json")
    with pytest.raises(BundleError, match="parity.json: expected a file inside the bundle, found a link"):
        load_bundle(bundle_dir, probe_gpu=False)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="expected a bundle folder or .zip with manifest.json, found nothing"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"empty/manifest\.json: expected the bundle manifest, found nothing"):
        load_bundle(tmp_path / "empty")


def test_open_runner_from_bundle(bundle_dir: Path) -> None:
    pytest.importorskip("onnx")
    with load_bundle(bundle_dir, probe_gpu=False) as bundle:
        with bundle.open_runner("auto", threads=1) as runner:
            assert isinstance(runner, OnnxRuntimeRunner) and runner.providers[-1] == "CPUExecutionProvider"
            out = runner({"image": np.ones((1, 4, 8, 8, 8), np.float32)})
            assert out["scores"].shape == (1, 3, 8, 8, 8)
        with pytest.raises(EngineError, match="segmenter.h100.fp16.plan: expected TensorRT 10.3.0"):
            bundle.open_runner("tensorrt")


def test_open_runner_refuses_a_model_that_differs_from_the_manifest(bundle_dir: Path) -> None:
    pytest.importorskip("onnx")
    _edit_manifest(bundle_dir, lambda d: d["engines"][0]["inputs"][0].update(name="volume"))
    with load_bundle(bundle_dir, probe_gpu=False) as bundle, pytest.raises(
            EngineError, match=r"segmenter\.onnx: expected the tensors of manifest\.json \(volume: float32\[N, 4, "):
        bundle.open_runner("cpu")


def test_open_runner_refuses_other_fixed_dims(bundle_dir: Path) -> None:
    pytest.importorskip("onnx")
    _edit_manifest(bundle_dir, lambda d: d["engines"][0]["inputs"][0].update(shape=["N", 4, 16, 16, 16]))
    with load_bundle(bundle_dir, probe_gpu=False) as bundle, pytest.raises(
            EngineError, match=re.escape("(image: float32[N, 4, 16, 16, 16], scores: float32[N, 3, 8, 8, 8]), "
                                         "found image: float32[N, 4, 8, 8, 8], scores: float32[N, 3, 8, 8, 8]")):
        bundle.open_runner("cpu")
