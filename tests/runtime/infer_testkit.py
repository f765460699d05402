"""Builders shared by the ``d4m-infer run`` tests: a tiny random-weight bundle and tiny DICOM studies.

Not a test module (no ``test_`` prefix): the test files load it by path, because
``--import-mode=importlib`` puts no test folder on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.volume import Volume
from d4m.runtime.bundle import sha256_file, write_manifest
from d4m.runtime.manifest import EngineEntry, Manifest, Preprocessing, SlidingWindow, TensorEntry

#: Identity written into every tiny study; tests check it never leaves the SEG.
PATIENT_NAME = "SECRET^TINYPATIENT"
PATIENT_ID = "TINY-PID-90210"
ACCESSION = "ACC-SECRET-77"

PATCH = (16, 32, 32)
SPACING = (4.0, 4.0, 5.0)

#: Series number, description, contrast agent, acquisition time per phase.
_SERIES = {
    Phase.NC: (2, "Abdomen native 5mm", None, "100000.000000"),
    Phase.ART: (3, "Abdomen arterial 5mm", "Iomeprol 350", "100230.000000"),
    Phase.PVP: (4, "Abdomen portal venous 5mm", "Iomeprol 350", "100310.000000"),
    Phase.DEL: (5, "Abdomen delayed 3min 5mm", "Iomeprol 350", "100500.000000"),
}
#: HU of (body, liver, tumour) per phase.
_HU = {
    Phase.NC: (30.0, 55.0, 35.0),
    Phase.ART: (45.0, 75.0, 130.0),
    Phase.PVP: (60.0, 115.0, 70.0),
    Phase.DEL: (55.0, 95.0, 60.0),
}


def export_tiny_bundle(folder: Path, seed: int = 0, filters: Sequence[int] = (4, 8, 16)) -> Path:
    """A bundle with a random-weight MONAI DynUNet (4 → 3 channels) exported to ONNX (TorchScript exporter)."""
    import torch
    from monai.networks.nets import DynUNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    levels = len(filters)
    strides = [1] + [2] * (levels - 1)
    network = DynUNet(spatial_dims=3, in_channels=4, out_channels=3, kernel_size=[3] * levels, strides=strides,
                      upsample_kernel_size=strides[1:], filters=list(filters),
                      norm_name=("INSTANCE", {"affine": True}), res_block=False).eval()
    path = folder / "segmenter.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.zeros(1, 4, *PATCH),), str(path), input_names=["image"],
                          output_names=["scores"], dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}},
                          opset_version=17, dynamo=False)
    entry = EngineEntry("segmenter", "segmenter.onnx", "onnx", "fp32", (TensorEntry("image", ("N", 4, *PATCH)),),
                        (TensorEntry("scores", ("N", 3, *PATCH)),), sha256_file(path), opset=17)
    manifest = Manifest(phases=PHASE_ORDER, preprocessing=Preprocessing((-21.0, 189.0), 90.0, 40.0, SPACING),
                        sliding_window=SlidingWindow(PATCH, 0.25), engines=(entry,),
                        provenance={"note": "random weights, for tests"})
    write_manifest(folder, manifest)
    return folder


def cached_tiny_bundle(cache_root: Path) -> Path:
    """:func:`export_tiny_bundle` once per version of this file and of torch/monai, reused across test modules.

    The bundle is built in a temporary sibling and renamed, so a half-built bundle is never reused;
    without torch and without a cached bundle the calling test is skipped.
    """
    import pytest

    versions = []
    for name in ("torch", "monai", "onnx"):
        try:
            versions.append(metadata.version(name))
        except metadata.PackageNotFoundError:
            versions.append("-")
    key = hashlib.sha256(Path(__file__).read_bytes() + " ".join(versions).encode()).hexdigest()[:16]
    folder = cache_root / f"tiny-bundle-{key}"
    if (folder / "manifest.json").is_file():
        return folder
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    tmp = cache_root / f".tiny-bundle-{uuid.uuid4().hex[:8]}"
    export_tiny_bundle(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_phase_volume(phase: Phase, shape: tuple[int, int, int] = (12, 40, 40),
                      spacing: tuple[float, float, float] = (6.0, 6.0, 8.0), shift_mm: float = 0.0,
                      seed: int = 0) -> Volume:
    """An ellipse body with a liver and one tumour, in the HU of ``phase``, feet-first geometry."""
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    body_hu, liver_hu, tumor_hu = _HU[phase]
    array = np.full(shape, -1000.0, np.float32)
    body = ((i - ni / 2) / (ni * 0.42)) ** 2 + ((j - nj / 2) / (nj * 0.33)) ** 2 <= 1
    array[body] = body_hu
    liver = ((i - ni * 0.38) / (ni * 0.2)) ** 2 + ((j - nj * 0.48) / (nj * 0.18)) ** 2 + (
        (k - nk / 2) / (nk * 0.38)) ** 2 <= 1
    array[liver] = liver_hu
    tumor = ((i - ni * 0.36) ** 2 + (j - nj * 0.47) ** 2) / 9.0 + ((k - nk / 2) / 2.0) ** 2 <= 1
    array[tumor] = tumor_hu
    array += np.random.default_rng(seed).normal(0, 5, shape).astype(np.float32)
    origin = (-(ni - 1) / 2 * spacing[0] + shift_mm, -(nj - 1) / 2 * spacing[1], 400.0)
    return Volume(np.rint(array), spacing, origin, np.diag([1.0, 1.0, -1.0]))


def write_tiny_study(
    folder: Path,
    phases: Sequence[Phase] = PHASE_ORDER,
    study_uid: str | None = None,
    encodings: dict[Phase, str] | None = None,
    intercepts: dict[Phase, float] | None = None,
    shape: tuple[int, int, int] = (12, 40, 40),
) -> dict[Phase, Path]:
    """Write the given phases of one tiny study as DICOM CT series ``folder/S<number>/``."""
    study_uid = study_uid or generate_uid()
    frame = generate_uid()
    folders = {}
    for n, phase in enumerate(phases):
        number, description, agent, when = _SERIES[phase]
        meta = CTSeriesMeta(
            study_uid=study_uid, frame_of_reference_uid=frame, series_number=number, description=description,
            contrast_agent=agent, contrast_start_time="100200" if agent else None, acquisition_time=when,
            patient_name=PATIENT_NAME, patient_id=PATIENT_ID, accession_number=ACCESSION,
            encoding=(encodings or {}).get(phase, "explicit"),
            rescale_intercept=(intercepts or {}).get(phase, -1024.0),
        )
        volume = tiny_phase_volume(phase, shape=shape, shift_mm=2.0 * n, seed=n)
        folders[phase] = folder / f"S{number}"
        write_ct_series(volume, folders[phase], meta)
    return folders


def trained_bundle_dice(root: Path, cases: int = 5, steps: int = 300, held_out: int = 7) -> dict[str, dict[str, float]]:
    """Phantom cohort → ``train_segmenter`` (tiny preset) → ``write_onnx_bundle`` → ``d4m-infer run`` per phase subset.

    Returns
    -------
    dict
        Phase subset (``"NC+PVP"``) → liver and tumour Dice on a held-out phantom study (its truth
        on the reference phase's grid), plus the reference phase and the run's seconds.
    """
    import time

    from d4m.dicom_io.series import scan_folder
    from d4m.export.bundle_writer import ExportConfig, write_onnx_bundle
    from d4m.runtime.infer import InferConfig, run
    from d4m.runtime.preprocess import Interpolator, resample_like
    from d4m.training.evaluation import dice, every_phase_subset, phase_set_name
    from d4m.training.phantom import PhantomConfig, generate_case, write_case, write_cohort
    from d4m.training.segmenter import segmenter_preset
    from d4m.training.segmenter_training import train_segmenter

    phantom = PhantomConfig(cases=cases, seed=0, size="small")
    write_cohort(root / "data", phantom)
    config = segmenter_preset("tiny", data=root / "data", out=root / "run", steps=steps, phase_dropout=0.5,
                              split=(0.8, 0.2, 0.0))
    train_segmenter(config)
    bundle = write_onnx_bundle(ExportConfig(run=root / "run", out=root / "bundle"))
    case = generate_case(held_out, PhantomConfig(cases=held_out + 1, seed=0, size="small"))
    write_case(case, root / "heldout", write_dicom=True)
    dicom = root / "heldout" / "dicom"
    folder_of = {p: dicom / f"S{case.acquisitions[p].series_number:04d}" for p in PHASE_ORDER}
    results: dict[str, dict[str, float]] = {}
    for subset in every_phase_subset():
        name = phase_set_name(subset)
        study = root / "subsets" / name
        for phase in subset:
            shutil.copytree(folder_of[phase], study / folder_of[phase].name)
        start = time.perf_counter()
        result = run(InferConfig(study, bundle, root / "out" / name, qc=False))
        reference = Phase(result.report["phases"]["reference"])
        truth = resample_like(case.truth[reference], result.labels, Interpolator.NEAREST, 0).array
        predicted = result.labels.array
        results[name] = {"reference": reference.value,  # type: ignore[dict-item]
                         "liver_dice": round(dice(predicted > 0, truth > 0), 4),
                         "tumor_dice": round(dice(predicted == 2, truth == 2), 4),
                         "seconds": round(time.perf_counter() - start, 1)}
        assert len(scan_folder(study).series) == len(subset)
    return results
