"""Synthesis: exact blending, the rules baseline, online and offline use, the quality filter, end to end."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image
from d4m.training.autoencoder import AutoencoderConfig, train_autoencoder
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.ldm import LDMConfig, train_ldm
from d4m.training.synthesis import (
    LatentDiffusionSynthesizer,
    OnlineSynthesis,
    QualityFilter,
    RuleSynthesizer,
    SynthesisConfig,
    synthesize_case,
    synthesize_dataset,
    synthesize_with_mask,
)
from d4m.training.tumor_masks import SizeClass, TumorMaskConfig

SPACING = (1.5, 1.5, 2.5)
LIVER_HU = {Phase.NC: 55.0, Phase.ART: 75.0, Phase.PVP: 115.0, Phase.DEL: 95.0}
SMALL = TumorMaskConfig(size_classes=(SizeClass.TINY, SizeClass.SMALL), class_weights=(1.0, 1.0), count=(1, 2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def normal_case(shape: tuple[int, int, int] = (20, 40, 40),
                seed: int = 0) -> tuple[dict[Phase, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    liver = ((k - 10) / 8) ** 2 + ((j - 20) / 14) ** 2 + ((i - 20) / 14) ** 2 <= 1
    images = {p: (np.where(liver, LIVER_HU[p], 40.0) + rng.normal(0, 5, shape)).astype(np.float32)
              for p in PHASE_ORDER}
    return images, liver


class NoiseSynthesizer:
    """A stand-in that returns noise everywhere in its crop: the blend must confine it."""

    name = "noise"
    crop_multiple = 8
    min_crop = (16, 16, 16)
    blend_margin_mm = 3.0

    def __init__(self) -> None:
        self.crops: list[tuple[int, ...]] = []

    def synthesize(self, crop: Mapping[Phase, np.ndarray], mask: np.ndarray, liver: np.ndarray,
                   spacing: tuple[float, float, float], rng: np.random.Generator) -> dict[Phase, np.ndarray]:
        self.crops.append(mask.shape)
        assert mask.any() and liver.any()
        return {p: rng.normal(500.0, 100.0, v.shape).astype(np.float32) for p, v in crop.items()}


def test_blend_leaves_voxels_beyond_the_margin_bit_identical() -> None:
    images, liver = normal_case()
    mask = np.zeros_like(liver)
    mask[9:12, 18:23, 12:16] = True
    mask[9:11, 20:24, 26:29] = True  # a second tumour: a second crop
    painter = NoiseSynthesizer()
    out = synthesize_with_mask(images, liver, mask, SPACING, np.random.default_rng(0), painter)
    distance = ndimage.distance_transform_edt(~mask, sampling=SPACING[::-1])
    outside = distance >= painter.blend_margin_mm
    for phase in PHASE_ORDER:
        assert np.array_equal(out[phase][outside], images[phase][outside])
        assert (out[phase][mask] > 200).all()           # synthesized values inside the mask
        assert out[phase].dtype == images[phase].dtype
    assert len(painter.crops) == 2
    assert all(s % 8 == 0 and s >= 16 for shape in painter.crops for s in shape)


def test_rules_change_only_the_mask_and_make_hcc_bright_in_art() -> None:
    images, liver = normal_case()
    mask = np.zeros_like(liver)
    mask[8:13, 15:25, 15:25] = True
    hcc = RuleSynthesizer(type_weights=(1.0, 0.0, 0.0))
    out = synthesize_with_mask(images, liver, mask, SPACING, np.random.default_rng(0), hcc)
    core = ndimage.binary_erosion(mask, iterations=2)
    for phase in PHASE_ORDER:
        assert np.array_equal(out[phase][~mask], images[phase][~mask])
        assert not np.array_equal(out[phase][mask], images[phase][mask])
    delta = {p: float(out[p][core].mean() - images[p][core].mean()) for p in PHASE_ORDER}
    assert delta[Phase.ART] > 20 and delta[Phase.PVP] < -10 and delta[Phase.DEL] < -10  # wash-in, washout
    cyst = RuleSynthesizer(type_weights=(0.0, 0.0, 1.0), texture_hu=0.0)
    water = synthesize_with_mask(images, liver, mask, SPACING, np.random.default_rng(0), cyst)
    assert all(abs(float(np.median(water[p][core])) - 10.0) < 1.0 for p in PHASE_ORDER)


def test_synthesize_case_labels_shapes_and_determinism() -> None:
    images, liver = normal_case()
    painter = RuleSynthesizer()
    a_images, a_label = synthesize_case(images, liver, SPACING, np.random.default_rng(4), painter, masks=SMALL)
    b_images, b_label = synthesize_case(images, liver, SPACING, np.random.default_rng(4), painter, masks=SMALL)
    assert np.array_equal(a_label, b_label) and all(np.array_equal(a_images[p], b_images[p]) for p in PHASE_ORDER)
    assert a_label.dtype == np.uint8 and set(np.unique(a_label)) == {0, 1, 2}
    assert np.array_equal(a_label > 0, liver)                      # liver from the normal case
    changed = np.logical_or.reduce([a_images[p] != images[p] for p in PHASE_ORDER])
    assert np.array_equal(changed, a_label == 2)                    # tumour label = what changed (rules)
    _, c_label = synthesize_case(images, liver, SPACING, np.random.default_rng(5), painter, masks=SMALL)
    assert not np.array_equal(a_label, c_label)


def test_no_liver_is_a_clear_error_and_online_passes_such_patches() -> None:
    images, liver = normal_case()
    with pytest.raises(InputError, match="expected a liver label"):
        synthesize_case(images, np.zeros_like(liver), SPACING, np.random.default_rng(0), RuleSynthesizer())
    outside = ~liver
    with pytest.raises(InputError, match="inside the liver"):
        synthesize_with_mask(images, liver, outside, SPACING, np.random.default_rng(0), RuleSynthesizer())
    with pytest.raises(InputError, match="one grid"):
        synthesize_with_mask({Phase.NC: images[Phase.NC][:-1]}, liver, liver & False, SPACING,
                             np.random.default_rng(0), RuleSynthesizer())
    sample = {p.value: v for p, v in images.items()} | {"label": np.zeros(liver.shape, np.uint8)}
    online = OnlineSynthesis(RuleSynthesizer(), p=1.0)
    assert online(sample) is sample  # a patch without liver: passed through, no crash
    with pytest.raises(InputError, match="expected phase images and a 'label'"):
        online({"image": images[Phase.NC]})


def test_online_transform_keeps_keys_shapes_and_uses_normal_images() -> None:
    images, liver = normal_case()
    label = liver.astype(np.uint8)
    label[10, 20, 20] = 2  # a real tumour, to be replaced (normal images are given)
    sample = {p.value: images[p][None] + 7.0 for p in PHASE_ORDER}           # (1, D, H, W) channel form
    sample |= {f"normal_{p.value}": images[p] for p in PHASE_ORDER}
    sample["label"] = label[None]
    online = OnlineSynthesis(RuleSynthesizer(), p=1.0, masks=SMALL, spacing=SPACING, seed=3)
    out = online(sample)
    assert out.keys() == sample.keys()
    assert all(out[k].shape == sample[k].shape and out[k].dtype == sample[k].dtype for k in sample)
    new_label = out["label"][0]
    assert (new_label == 2).any() and np.array_equal(new_label > 0, liver)
    outside = new_label != 2
    assert np.array_equal(out["PVP"][0][outside], images[Phase.PVP][outside])  # normal background
    never = OnlineSynthesis(RuleSynthesizer(), p=0.0)
    assert never(sample) is sample and never.calls == 1 and never.applied == 0


def test_online_without_normal_images_keeps_existing_tumours() -> None:
    images, liver = normal_case()
    label = liver.astype(np.uint8)
    label[9:12, 18:22, 18:22] = 2
    sample = {p.value: images[p] for p in PHASE_ORDER} | {"label": label, "spacing": np.array(SPACING)}
    out = OnlineSynthesis(RuleSynthesizer(), p=1.0, masks=SMALL, seed=1)(sample)
    assert (out["label"][label == 2] == 2).all() and (out["label"] == 2).sum() > (label == 2).sum()
    assert np.array_equal(out["ART"][label == 2], images[Phase.ART][label == 2])  # old tumour untouched


def test_quality_filter_undoes_tumours_the_segmenter_misses() -> None:
    images, liver = normal_case()
    blind = QualityFilter(lambda imgs: np.zeros(liver.shape))
    out, label = synthesize_case(images, liver, SPACING, np.random.default_rng(2), RuleSynthesizer(), masks=SMALL,
                                 quality=blind)
    assert not (label == 2).any() and all(np.array_equal(out[p], images[p]) for p in PHASE_ORDER)
    seer = QualityFilter(lambda imgs: (np.abs(imgs[Phase.ART] - LIVER_HU[Phase.ART]) > 15).astype(float),
                         min_detected=0.3)
    _, kept = synthesize_case(images, liver, SPACING, np.random.default_rng(2), RuleSynthesizer(type_weights=(1, 0, 0)),
                              masks=SMALL, quality=seer)
    assert (kept == 2).any()


def write_cases(root: Path, n: int = 2, shape: tuple[int, int, int] = (20, 40, 40), normal: bool = True) -> Path:
    cases = []
    for c in range(n):
        images, liver = normal_case(shape, seed=c)
        tumor = np.zeros_like(liver)
        tumor[9:12, 18:23, 18:23] = True
        label = liver.astype(np.uint8) + (tumor & liver)
        folder = root / f"case_{c}"
        files: dict[str, dict[Phase, Path]] = {"images": {}, "normal": {}}
        for phase in PHASE_ORDER:
            for kind, array in (("images", np.where(tumor, images[phase] + 40, images[phase])),
                                ("normal", images[phase])):
                files[kind][phase] = folder / kind / f"{phase.value}.nii.gz"
                write_image(Volume(array.astype(np.float32), SPACING, (5.0, -3.0, 2.0)), files[kind][phase])
        write_image(Volume(label, SPACING, (5.0, -3.0, 2.0)), folder / "label.nii.gz")
        cases.append(Case(f"case_{c}", files["images"], folder / "label.nii.gz",
                          normal=files["normal"] if normal else {}))
    Dataset(root, tuple(cases)).save()
    return root


def test_offline_rules_dataset_and_missing_normal_images(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data")
    config = SynthesisConfig(data=data, out=tmp_path / "synthetic", synthesizer="rules", copies=2, tumors=(1, 2),
                             size_classes=("tiny", "small"), class_weights=(1.0, 1.0), avoid_vessels=True)
    dataset = synthesize_dataset(config)
    assert [c.id for c in dataset.cases] == ["case_0_syn00", "case_0_syn01", "case_1_syn00", "case_1_syn01"]
    case = dataset.cases[0]
    label = read_image(case.label)
    assert label.origin == pytest.approx((5.0, -3.0, 2.0)) and label.spacing == pytest.approx(SPACING)
    assert (label.array == 2).any() and case.meta["synthetic"] and case.meta["tumors"]
    assert load_dataset(tmp_path / "synthetic").source["synthesizer"] == "rules"
    with pytest.raises(InputError, match="existing"):
        synthesize_dataset(config)
    bare = write_cases(tmp_path / "bare", n=1, normal=False)
    with pytest.raises(InputError, match="expected normal images"):
        synthesize_dataset(config.replace(data=bare, out=tmp_path / "bare_out"))


def test_tiny_end_to_end_autoencoder_ldm_synthesis(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data")
    autoencoder = train_autoencoder(AutoencoderConfig.from_preset(
        "tiny", data=data, out=tmp_path / "ae", crop=(16, 16, 16), steps=2, batch_size=1, val_crops=1, device="cpu"))
    ldm = train_ldm(LDMConfig.from_preset("tiny", data=data, autoencoder=autoencoder, out=tmp_path / "ldm",
                                          crop=(16, 16, 16), steps=2, batch_size=1, val_crops=1, device="cpu"))
    painter = LatentDiffusionSynthesizer.from_runs(autoencoder, ldm, ddim_steps=3, device="cpu")
    assert painter.name == "ldm-per-phase" and painter.min_crop == (16, 16, 16)
    images, liver = normal_case()
    a_images, a_label = synthesize_case(images, liver, SPACING, np.random.default_rng(0), painter, masks=SMALL)
    b_images, _ = synthesize_case(images, liver, SPACING, np.random.default_rng(0), painter, masks=SMALL)
    assert all(np.array_equal(a_images[p], b_images[p]) for p in PHASE_ORDER)
    assert (a_label == 2).any()
    distance = ndimage.distance_transform_edt(a_label != 2, sampling=SPACING[::-1])
    far = distance >= painter.blend_margin_mm
    assert all(np.array_equal(a_images[p][far], images[p][far]) for p in PHASE_ORDER)
    dataset = synthesize_dataset(SynthesisConfig(data=data, out=tmp_path / "synthetic", autoencoder=autoencoder,
                                                 ldm=ldm, ddim_steps=2, tumors=(1, 1), device="cpu",
                                                 size_classes=("small",), class_weights=(1.0,)))
    assert len(dataset) == 2 and dataset.cases[0].meta["synthesizer"] == "ldm-per-phase"
    assert set(dataset.cases[0].images) == set(PHASE_ORDER)
