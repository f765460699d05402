"""The segmenter: config, networks, patch data, a tiny training run, resume, DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.runtime.postprocess import PostprocessSettings
from d4m.runtime.preprocess import Normalization
from d4m.training.checkpoints import read_weights
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.evaluation import EvaluationConfig, evaluate
from d4m.training.postprocess_choice import PostprocessChoice, choose_for_run, save_choice
from d4m.training.segmenter import (
    NETWORKS,
    Backbone,
    Preset,
    SegmenterConfig,
    build_network,
    memory_format,
    segmenter_preset,
    torch_predictor,
)
from d4m.training.segmenter_data import (
    PatchDataset,
    crop,
    drop_phases,
    load_case,
    select_fraction,
    split_cases,
)
from d4m.training.segmenter_training import poly_lr, synthesis_hook, synthetic_cases, train_segmenter
from d4m.training.synthesis import OnlineSynthesis, RuleSynthesizer, SynthesisConfig

SPACING = (1.5, 1.5, 3.0)
LIVER_HU = {"NC": 55, "ART": 80, "PVP": 120, "DEL": 100}
TUMOR_HU = {"NC": 40, "ART": 30, "PVP": 70, "DEL": 80}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_dataset(root: Path, cases: int = 5, shape: tuple[int, int, int] = (16, 32, 32), seed: int = 0) -> Dataset:
    """Blob 'livers' with one ellipsoid tumour each, four phases with their own contrast."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    written = []
    for n in range(cases):
        centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        liver = sum(((g - c) / (s * 0.35)) ** 2 for g, c, s in zip((z, y, x), centre, shape, strict=True)) <= 1
        tc = centre + rng.uniform(-2, 2, 3)
        radius = rng.uniform(2.5, 4)
        tumor = ((z - tc[0]) / 1.0) ** 2 + ((y - tc[1]) / 1.5) ** 2 + ((x - tc[2]) / 1.5) ** 2 <= radius**2
        label = liver.astype(np.uint8)
        label[tumor & liver] = 2
        folder = root / f"case_{n:03d}"
        images = {}
        for phase in PHASE_ORDER:
            image = rng.normal(-100, 8, shape)
            image[label == 1] += LIVER_HU[phase.value] + 100
            image[label == 2] += TUMOR_HU[phase.value] + 100
            images[phase] = folder / f"{phase.value}.nii.gz"
            write_image(Volume(image.astype(np.int16), SPACING, (0.0, 0.0, 0.0)), images[phase])
        write_image(Volume(label, SPACING, (0.0, 0.0, 0.0)), folder / "label.nii.gz")
        written.append(Case(f"case_{n:03d}", images, folder / "label.nii.gz"))
    dataset = Dataset(root, tuple(written))
    dataset.save()
    return load_dataset(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_dataset(tmp_path_factory.mktemp("segmenter-data"))


def tiny(data: Path, out: Path, **changes: object) -> SegmenterConfig:
    values: dict[str, object] = {
        "data": data, "out": out, "filters": (4, 8, 16), "patch_size": (16, 16, 16), "steps": 6,
        "batch_size": 2, "val_every": 3, "cache": True, "phase_dropout": 0.3, "patches_per_case": 2,
    }
    values.update(changes)
    return SegmenterConfig(**values)  # type: ignore[arg-type]


# -- config ---------------------------------------------------------------------------------

def test_config_round_trip_and_presets(tmp_path: Path) -> None:
    config = segmenter_preset("tiny", data=tmp_path / "d", out=tmp_path / "o", norm_mean=80.0, norm_std=30.0)
    assert config.preset is Preset.TINY and config.backbone is Backbone.DYNUNET
    config.save(tmp_path / "config.json")
    loaded = SegmenterConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert loaded.normalization == Normalization((-21.0, 189.0), 80.0, 30.0)
    paper = segmenter_preset(Preset.PAPER)
    assert paper.patch_size == (96, 96, 96) and paper.ce_weight == 0.5 and paper.hu_window == (-21.0, 189.0)
    assert segmenter_preset("cpu").steps > segmenter_preset("tiny").steps


def test_tiny_segresnet_gets_its_own_widths_and_learning_rate_unless_given() -> None:
    assert (segmenter_preset("tiny").lr, segmenter_preset("tiny").filters) == (1e-2, (8, 16, 32, 64))
    segresnet = segmenter_preset("tiny", backbone="segresnet")
    assert (segresnet.lr, segresnet.filters, segresnet.steps) == (1e-3, (16, 32, 64, 128), 800)
    assert segmenter_preset("tiny", backbone="segresnet", lr=5e-3).lr == 5e-3
    assert segmenter_preset("tiny", backbone="segresnet", filters=(8, 16)).filters == (8, 16)
    assert segmenter_preset("paper", backbone="segresnet").lr == segmenter_preset("paper").lr


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_every_preset_gives_swinunetr_a_feature_size_and_patch_it_can_use(preset: str) -> None:
    config = segmenter_preset(preset, backbone="swinunetr")
    assert config.filters[0] % 12 == 0 and all(p % 32 == 0 and p >= 64 for p in config.patch_size)
    assert segmenter_preset(preset).filters != config.filters  # the preset's DynUNet widths do not fit


def test_tiny_swinunetr_warms_up_to_a_lower_learning_rate() -> None:
    config = segmenter_preset("tiny", backbone="swinunetr")
    assert (config.lr, config.warmup_steps) == (1e-3, 80)
    assert segmenter_preset("tiny").warmup_steps == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"patch_size": (16, 16, 18)}, "multiples of 4"),
     ({"patch_size": (4, 16, 16)}, "at least 8"),
     ({"phases": (Phase.NC, Phase.NC, Phase.PVP, Phase.DEL)}, "each of NC, ART, PVP, DEL once"),
     ({"sampling": (0.5, 0.5, 0.5)}, "summing to 1"),
     ({"synthetic_ratio": 0.5}, "either a synthesizer"),
     ({"synthetic_ratio": 0.5, "synthesizer": Path("s"), "synthetic_data": Path("d")}, "either a synthesizer"),
     ({"norm_mean": 1.0}, "given together"),
     ({"backbone": "swinunetr", "filters": (12, 24)}, "multiples of 32, at least 64")],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(Path("d"), Path("o"), **changes)


def test_unmeasured_normalization_is_refused() -> None:
    with pytest.raises(ValueError, match="not measured"):
        _ = tiny(Path("d"), Path("o")).normalization


# -- networks -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "backbone",
    # SwinUNETR needs 64³ (5-10 s on 2 cores): its forward pass is a slow test, its build a fast one
    [pytest.param(b, marks=pytest.mark.slow) if b is Backbone.SWINUNETR else b for b in Backbone],
)
def test_every_backbone_builds_and_maps_4_phases_to_3_classes(backbone: Backbone) -> None:
    sizes = {
        Backbone.SWINUNETR: ((12, 24, 48, 96), (64, 64, 64)),
        Backbone.SEGRESNET: ((8, 16, 32), (16, 16, 16)),
    }
    filters, patch = sizes.get(backbone, ((4, 8, 16), (16, 16, 16)))
    config = SegmenterConfig(backbone=backbone, filters=filters, patch_size=patch)
    network = build_network(config).eval()
    with torch.no_grad():
        out = network(torch.zeros(1, 4, *patch))
    assert tuple(out.shape) == (1, 3, *patch)
    assert set(NETWORKS) == set(Backbone)


@pytest.mark.parametrize("backbone", [b for b in Backbone if b is not Backbone.SWINUNETR])
def test_cpu_predictor_in_channels_last_matches_the_default_layout(backbone: Backbone) -> None:
    filters = (8, 16, 32) if backbone is Backbone.SEGRESNET else (4, 8, 16)
    config = SegmenterConfig(backbone=backbone, filters=filters, patch_size=(16, 16, 16))
    torch.manual_seed(0)
    network = build_network(config).eval()
    batch = np.random.default_rng(0).normal(size=(2, 4, 16, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(batch)).numpy()
    assert memory_format(torch.device("cpu")) is torch.channels_last_3d
    logits = torch_predictor(network, "cpu")(batch)
    assert next(network.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_swinunetr_builds_with_4_inputs_and_3_outputs() -> None:
    network = build_network(SegmenterConfig(backbone="swinunetr", filters=(12, 24), patch_size=(64, 64, 64)))
    assert network.out.conv.conv.out_channels == 3
    assert network.swinViT.patch_embed.proj.in_channels == 4


# -- data -----------------------------------------------------------------------------------

def test_split_is_deterministic_and_honours_meta(dataset: Dataset) -> None:
    parts = split_cases(dataset, (0.6, 0.2, 0.2), seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert parts == split_cases(dataset, (0.6, 0.2, 0.2), seed=0)
    assert {c.id for k in parts for c in parts[k]} == {c.id for c in dataset.cases}
    pinned = Dataset(dataset.root, (Case("x", dataset.cases[0].images, meta={"split": "test"}), *dataset.cases[1:]))
    assert "x" in [c.id for c in split_cases(pinned, (1.0, 0.0, 0.0), 0)["test"]]
    assert len(select_fraction(parts["train"], 0.1, 0)) == 1
    bad = Dataset(dataset.root, (Case("y", dataset.cases[0].images, meta={"split": "holdout"}),))
    with pytest.raises(InputError, match="holdout"):
        split_cases(bad, (0.6, 0.2, 0.2), 0)


def test_crop_pads_outside_the_image() -> None:
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = crop(array, (-1, 1, 2), (3, 3, 3), fill=-5.0)
    assert out.shape == (3, 3, 3)
    assert out[0].max() == -5.0 and out[1, 0, 0] == array[0, 1, 2] and out[1, 0, 1] == -5.0


def test_phase_dropout_fills_with_the_inference_rule() -> None:
    image = np.stack([np.full((2, 2, 2), i, np.float32) for i in range(4)])
    seen = set()
    for seed in range(60):
        out, kept = drop_phases(image, np.random.default_rng(seed))
        seen.add(kept)
        assert 0 < len(kept) < 4
        assert {int(v) for v in out[:, 0, 0, 0]} == {PHASE_ORDER.index(p) for p in kept}
    assert len(seen) > 8


def test_patches_are_deterministic_tumour_aware_and_sharded(dataset: Dataset) -> None:
    config = tiny(dataset.root, Path("unused"), sampling=(1.0, 0.0, 0.0), phase_dropout=0.0)
    norm = Normalization(mean=80.0, std=30.0)
    data = PatchDataset(dataset.cases[:3], config, norm, SPACING)
    assert len(data) == config.steps * config.batch_size
    first, again = data[3], PatchDataset(dataset.cases[:3], config, norm, SPACING)[3]
    assert first["image"].shape == (4, 16, 16, 16) and first["label"].shape == (1, 16, 16, 16)
    assert first["image"].dtype == torch.float32 and first["label"].dtype == torch.int64
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert all((data[i]["label"] == 2).any() for i in range(6)), "tumour-centred patches hold tumour"
    # two processes with batch 1 draw exactly the samples of one process with batch 2
    single = tiny(dataset.root, Path("unused"), batch_size=2)
    halves = tiny(dataset.root, Path("unused"), batch_size=1)
    one = PatchDataset(dataset.cases[:3], single, norm, SPACING)
    ranks = [PatchDataset(dataset.cases[:3], halves, norm, SPACING, shard=(r, 2, 0)) for r in (0, 1)]
    for step in range(3):
        for rank in (0, 1):
            assert torch.equal(one[2 * step + rank]["image"], ranks[rank][step]["image"])
    resumed = PatchDataset(dataset.cases[:3], single, norm, SPACING, shard=(0, 1, 2))
    assert torch.equal(resumed[0]["image"], one[4]["image"])


def test_synthesis_hook_makes_deterministic_hybrid_patches(dataset: Dataset, tmp_path: Path) -> None:
    config = tiny(dataset.root, Path("unused"), sampling=(0.0, 1.0, 0.0), phase_dropout=0.0)
    norm = Normalization(mean=80.0, std=30.0)

    def hybrid() -> PatchDataset:
        hook = OnlineSynthesis(RuleSynthesizer(), p=1.0, spacing=SPACING)
        return PatchDataset(dataset.cases[:3], config, norm, SPACING, synthesis=hook)

    real = PatchDataset(dataset.cases[:3], config, norm, SPACING)
    first, second = hybrid(), hybrid()
    changed = 0
    for index in range(4):
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        changed += int((a["label"] == 2).sum() > (real[index]["label"] == 2).sum())
    assert changed >= 3, "synthesized patches gain tumour voxels"
    # a config naming a synthesis config builds the same kind of hook
    SynthesisConfig(synthesizer="rules").save(tmp_path / "synthesis.json")
    hook = synthesis_hook(tiny(dataset.root, Path("o"), synthetic_ratio=0.5, synthesizer=tmp_path / "synthesis.json",
                               spacing=SPACING))
    assert isinstance(hook, OnlineSynthesis) and hook.p == 0.5
    assert synthesis_hook(config) is None


def test_offline_synthetic_cases_are_drawn_at_the_ratio(dataset: Dataset, tmp_path: Path) -> None:
    norm = Normalization(mean=80.0, std=30.0)
    real, fake = list(dataset.cases[:3]), list(dataset.cases[3:5])
    config = tiny(dataset.root, Path("unused"), synthetic_ratio=0.3, synthetic_data=tmp_path)
    hybrid = PatchDataset(real, config, norm, SPACING, synthetic=fake)
    groups = [hybrid.case_index(g * config.patches_per_case) for g in range(1000)]
    assert set(groups) == {0, 1, 2, 3, 4}
    assert 0.25 < np.mean([i >= 3 for i in groups]) < 0.35
    assert groups == [PatchDataset(real, config, norm, SPACING, synthetic=fake).case_index(2 * g) for g in range(1000)]
    assert torch.equal(hybrid[0]["image"], PatchDataset(real, config, norm, SPACING, synthetic=fake)[0]["image"])
    real_only = PatchDataset(real, tiny(dataset.root, Path("unused")), norm, SPACING)
    assert max(real_only.case_index(2 * g) for g in range(1000)) == 2
    # only the synthetic cases made from training cases are used (no test case leaks in)
    made = [Case(f"syn_{c.id}", dict(c.images), c.label, meta={"synthetic": True, "source_case": c.id})
            for c in dataset.cases]
    Dataset(tmp_path / "synthetic", tuple(made)).save()
    config = tiny(dataset.root, Path("o"), synthetic_ratio=0.5, synthetic_data=tmp_path / "synthetic")
    assert [c.id for c in synthetic_cases(config, real)] == ["syn_case_000", "syn_case_001", "syn_case_002"]
    assert synthetic_cases(tiny(dataset.root, Path("o")), real) == []
    with pytest.raises(InputError, match="made from the 1 training cases, found none of 5"):
        synthetic_cases(config, [Case("other", {}, None)])


def test_load_case_resamples_to_the_target_spacing(dataset: Dataset) -> None:
    arrays = load_case(dataset.cases[0], (3.0, 3.0, 3.0))
    assert arrays.image.shape == (4, 16, 16, 16) and arrays.label.shape == (16, 16, 16)
    assert set(np.unique(arrays.label)) <= {0, 1, 2} and len(arrays.centres["tumor"]) > 0
    assert arrays.present == PHASE_ORDER


# -- training ---------------------------------------------------------------------------------

def test_poly_lr() -> None:
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)


def test_poly_lr_warms_up_linearly_then_decays() -> None:
    assert poly_lr(0.01, 0, 100, warmup=10) == pytest.approx(0.001)
    assert poly_lr(0.01, 4, 100, warmup=10) == pytest.approx(0.005 * 0.96**0.9)
    assert [poly_lr(0.01, s, 100, warmup=10) for s in (9, 50)] == [poly_lr(0.01, s, 100) for s in (9, 50)]


def test_training_writes_checkpoints_and_resume_equals_uninterrupted(dataset: Dataset, tmp_path: Path) -> None:
    full = train_segmenter(tiny(dataset.root, tmp_path / "full", warmup_steps=4))
    for name in ("model.safetensors", "last.safetensors", "config.json", "metrics.csv", "metrics.json", "resume.pt",
                 "postprocess.json"):
        assert (full / name).is_file(), name
    choice = json.loads((full / "postprocess.json").read_text())
    assert choice["cases"] == 1 and set(choice["validation_tumor_dice"]) == {"0.0", "0.25", "0.5", "0.75", "0.9"}
    (full / "postprocess.json").unlink()
    choose_for_run(full, device="cpu")  # `d4m-train postprocess`: the same cases and weights, the same choice
    assert json.loads((full / "postprocess.json").read_text()) == choice
    saved = SegmenterConfig.load(full / "config.json")
    assert saved.spacing == SPACING and saved.norm_mean is not None and 60 < saved.norm_mean < 120
    rows = _csv(full / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    # the last step's learning rate: still warming up at step 3 of 4, decaying at step 6
    assert [float(r["lr"]) for r in rows] == pytest.approx([poly_lr(3e-3, 2, 6, warmup=4), poly_lr(3e-3, 5, 6)],
                                                           rel=1e-5)
    assert all(0.0 <= float(r["val_tumor_dice"]) <= 1.0 for r in rows)
    best = json.loads((full / "metrics.json").read_text())["best"]
    assert best["tumor_dice"] == pytest.approx(max(float(r["val_tumor_dice"]) for r in rows), rel=1e-5)

    class Killed(Exception):
        pass

    done = []

    def kill_after_four(n: int) -> None:
        done.append(n)
        if sum(done) == 4:
            raise Killed

    interrupted = tiny(dataset.root, tmp_path / "killed", warmup_steps=4)
    with pytest.raises(Killed):
        train_segmenter(interrupted, progress=kill_after_four)
    assert _csv(tmp_path / "killed" / "metrics.csv")[-1]["step"] == "3"
    advanced: list[int] = []
    train_segmenter(interrupted, progress=advanced.append)
    assert advanced[0] == 3 and sum(advanced) == 6
    a, b = read_weights(full / "last.safetensors"), read_weights(tmp_path / "killed" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    resumed_rows = _csv(tmp_path / "killed" / "metrics.csv")
    for key in ("step", "loss", "lr", "val_tumor_dice", "val_liver_dice"):
        assert [r[key] for r in resumed_rows] == [r[key] for r in rows], key

    # the trained folder evaluates on its test split, with all phases and with PVP only, post-processed
    # as its postprocess.json says
    save_choice(full, PostprocessChoice(PostprocessSettings(min_liver_contact=0.9), {}, 0))
    result = evaluate(EvaluationConfig(model=full, out=tmp_path / "eval", phase_sets=(PHASE_ORDER, (Phase.PVP,))))
    assert set(result["summary"]) == {"NC+ART+PVP+DEL", "PVP"}
    assert [row["phases"] for row in result["cases"]] == ["NC+ART+PVP+DEL", "PVP"]
    assert result["cases"][1]["duplicated"] == "NC<-PVP;ART<-PVP;DEL<-PVP"
    assert 0.0 <= result["summary"]["PVP"]["liver_dice"] <= 1.0
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"results.md", "results.csv", "results.json"}
    assert result["postprocess"] == {**PostprocessSettings().to_dict(), "min_liver_contact": 0.9}


def test_a_pvp_only_dataset_is_validated_and_evaluated_on_pvp(dataset: Dataset, tmp_path: Path) -> None:
    # the paper's unimodal baseline: its validation must not skip every case for lacking NC, ART, DEL
    view = Dataset(tmp_path / "pvp", tuple(dataclasses.replace(c, images={Phase.PVP: c.images[Phase.PVP]})
                                           for c in dataset.cases))
    view.save()
    run = train_segmenter(tiny(view.root, tmp_path / "run", steps=3, val_every=3))
    rows = _csv(run / "metrics.csv")
    assert 0.0 <= float(rows[0]["val_liver_dice"]) <= 1.0, "validated on PVP, duplicated"
    result = evaluate(EvaluationConfig(model=run, out=tmp_path / "eval", split="all"))
    assert set(result["summary"]) == {"PVP"} and result["summary"]["PVP"]["cases"] == len(dataset.cases)


def test_resume_with_another_config_is_refused(dataset: Dataset, tmp_path: Path) -> None:
    out = train_segmenter(tiny(dataset.root, tmp_path / "run", steps=2, val_every=0))
    with pytest.raises(InputError, match=r"other values of \['lr'\]"):
        train_segmenter(tiny(dataset.root, out, steps=2, val_every=0, lr=0.1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="new or empty output folder"):
        train_segmenter(tiny(dataset.root, tmp_path / "other"))


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


_DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from d4m.training.segmenter import SegmenterConfig
from d4m.training.segmenter_training import train_segmenter
train_segmenter(SegmenterConfig.load(Path(sys.argv[1])))
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_twice_the_batch(dataset: Dataset, tmp_path: Path) -> None:
    # DiceCELoss averages per sample and InstanceNorm is per sample, and process r of 2 draws
    # the samples a single process draws at batch position r: the weights must agree.
    single = train_segmenter(tiny(dataset.root, tmp_path / "single", steps=3, val_every=0, batch_size=2))
    config = tiny(dataset.root, tmp_path / "ddp", steps=3, val_every=0, batch_size=1)
    config.save(tmp_path / "ddp.json")
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "ddp.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_weights(single / "last.safetensors"), read_weights(tmp_path / "ddp" / "last.safetensors")
    # AdamW steps are ~lr = 3e-3 per weight: a wrong sharding differs by that much, float
    # reduction order by < 1e-4 (measured 2e-5 after 3 steps)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    assert [r["step"] for r in _csv(tmp_path / "ddp" / "metrics.csv")] == ["3"], "only rank 0 writes"
