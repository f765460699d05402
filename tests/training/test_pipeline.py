"""``d4m-train all``: stage skipping, resumption, changed configs (fake stages), presets, end to end (slow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import read_json, write_json
from d4m.training.config import StageConfig
from d4m.training.pipeline import (
    PIPELINE_FILE,
    PIPELINE_PRESETS,
    PipelineConfig,
    Stage,
    default_stages,
    pipeline_split,
    run_pipeline,
    stage_folders,
    stage_key,
)


@dataclasses.dataclass(frozen=True)
class FakeConfig(StageConfig):
    stage: ClassVar[str] = "fake"

    out: Path = Path("x")
    value: int = 0
    device: str = "cpu"


class Killed(RuntimeError):
    """Stands for a kill in the middle of a stage."""


class FakeStages:
    """Three fake stages: each writes ``step-<n>`` files, then ``out.txt``; ``resume.pt`` after one step."""

    def __init__(self) -> None:
        self.values = {"a": 1, "b": 2, "c": 3}
        self.device = "cpu"
        self.calls: list[str] = []
        self.resumed: list[str] = []
        self.kill: str | None = None
        self.kill_before_checkpoint = False

    def stages(self) -> list[Stage]:
        def build(name: str) -> Any:
            return lambda config, folders: FakeConfig(out=folders[name], value=self.values[name], device=self.device)

        def run(name: str) -> Any:
            def action(config: FakeConfig, progress: Any) -> None:
                self.calls.append(name)
                out = config.out
                if (out / "resume.pt").exists():
                    self.resumed.append(name)
                out.mkdir(parents=True, exist_ok=True)
                (out / "partial").write_text("started")
                if self.kill == name and self.kill_before_checkpoint:
                    raise Killed(name)
                (out / "resume.pt").write_text("1")
                if self.kill == name:
                    raise Killed(name)
                (out / "out.txt").write_text(str(config.value))
                if progress is not None:
                    progress(1)
            return action

        return [Stage(n, "out.txt", build(n), run(n), lambda c: 1, resume_file="resume.pt") for n in "abc"]


def _config(tmp_path: Path, overwrite: bool = False) -> PipelineConfig:
    return PipelineConfig(data=tmp_path, out=tmp_path / "run", preset="tiny", overwrite=overwrite)


def test_first_run_records_every_stage_then_everything_is_skipped(tmp_path: Path) -> None:
    fake = FakeStages()
    record = run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "c"]
    saved = read_json(tmp_path / "run" / PIPELINE_FILE)
    assert saved == record and saved["status"] == "done"
    assert [s["folder"] for s in saved["stages"]] == ["01-a", "02-b", "03-c"]
    assert all(s["status"] == "done" and s["seconds"] >= 0 for s in saved["stages"])
    assert saved["stages"][1]["config"]["value"] == 2
    fake.device = "cuda"  # not part of a stage's key
    record = run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "c"]
    assert all(s.get("skipped") for s in record["stages"])


def test_changed_config_is_refused_then_redone_with_overwrite(tmp_path: Path) -> None:
    fake = FakeStages()
    run_pipeline(_config(tmp_path), fake.stages())
    fake.values["b"] = 20
    with pytest.raises(InputError, match=r"02-b.*changes in \['value'\].*--overwrite"):
        run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "c"]
    assert (tmp_path / "run" / "02-b" / "out.txt").read_text() == "2"
    saved = read_json(tmp_path / "run" / PIPELINE_FILE)
    assert saved["status"] == "failed" and [s["name"] for s in saved["stages"]] == ["a", "b", "c"]
    fake.values["b"] = 2  # back to the recorded configuration: nothing to redo
    run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "c"]
    fake.values["b"] = 20
    run_pipeline(_config(tmp_path, overwrite=True), fake.stages())
    # a skipped, b redone, c redone because its upstream changed
    assert fake.calls == ["a", "b", "c", "b", "c"]
    assert fake.resumed == []
    assert (tmp_path / "run" / "02-b" / "out.txt").read_text() == "20"


def test_killed_stage_resumes_and_later_stages_run(tmp_path: Path) -> None:
    fake = FakeStages()
    fake.kill = "b"
    with pytest.raises(Killed):
        run_pipeline(_config(tmp_path), fake.stages())
    saved = read_json(tmp_path / "run" / PIPELINE_FILE)
    assert [s["status"] for s in saved["stages"]] == ["done", "running"]
    fake.kill = None
    run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "b", "c"]
    assert fake.resumed == ["b"]  # the folder was kept for the stage to resume


def test_stage_killed_before_its_first_checkpoint_starts_from_a_clean_folder(tmp_path: Path) -> None:
    fake = FakeStages()
    fake.kill, fake.kill_before_checkpoint = "a", True
    with pytest.raises(Killed):
        run_pipeline(_config(tmp_path), fake.stages())
    assert (tmp_path / "run" / "01-a" / "partial").exists()
    fake.kill = None
    seen: list[bool] = []
    stages = fake.stages()
    first = stages[0]
    stages[0] = dataclasses.replace(first, run=lambda c, p: (seen.append(c.out.exists()), first.run(c, p)))
    run_pipeline(_config(tmp_path), stages)
    assert seen == [False]
    assert fake.resumed == []


def test_missing_output_is_redone_and_unrecorded_folders_refused(tmp_path: Path) -> None:
    fake = FakeStages()
    run_pipeline(_config(tmp_path), fake.stages())
    (tmp_path / "run" / "03-c" / "out.txt").unlink()
    run_pipeline(_config(tmp_path), fake.stages())
    assert fake.calls == ["a", "b", "c", "c"]
    other = tmp_path / "other"
    (other / "run" / "01-a").mkdir(parents=True)
    with pytest.raises(InputError, match="unrecorded"):
        run_pipeline(_config(other), fake.stages())


def test_stage_key_follows_config_and_upstream_not_device() -> None:
    base = stage_key(FakeConfig(value=1), ["k"])
    assert stage_key(FakeConfig(value=1, device="cuda"), ["k"]) == base
    assert stage_key(FakeConfig(value=2), ["k"]) != base
    assert stage_key(FakeConfig(value=1), ["other"]) != base


def _fake_dataset(root: Path, cases: int) -> Path:
    entries = []
    for number in range(cases):
        folder = root / "cases" / f"case_{number:03d}"
        folder.mkdir(parents=True)
        for name in ("NC", "ART", "PVP", "DEL", "label"):
            (folder / f"{name}.nii.gz").write_bytes(b"")
        entries.append({"id": f"case_{number:03d}", "label": f"cases/case_{number:03d}/label.nii.gz",
                        "images": {p: f"cases/case_{number:03d}/{p}.nii.gz" for p in ("NC", "ART", "PVP", "DEL")}})
    write_json(root / "dataset.json", {"schema_version": 1, "kind": "d4m-dataset", "cases": entries})
    return root


@pytest.mark.parametrize("preset", sorted(PIPELINE_PRESETS))
def test_every_preset_builds_valid_stage_configs_with_held_out_cases(tmp_path: Path, preset: str) -> None:
    data = _fake_dataset(tmp_path / "data", 10)
    config = PipelineConfig(data=data, out=tmp_path / "run", preset=preset, seed=3)
    stages = default_stages()
    folders = stage_folders(config.out, stages)
    built = {s.name: s.build(config, folders) for s in stages}
    split = pipeline_split(config)
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"case_{i:03d}" for i in range(10)]
    assert split["test"] and not set(split["test"]) & set(split["train"])
    assert set(built["inpainter"].holdout) == set(split["val"] + split["test"])  # type: ignore[attr-defined]
    assert built["autoencoder"].data == folders["train-cases"]  # type: ignore[attr-defined]
    segmenter = built["segmenter"]
    assert segmenter.preset.value == preset  # type: ignore[attr-defined]
    assert segmenter.synthetic_ratio == PIPELINE_PRESETS[preset]["synthetic_ratio"]  # type: ignore[attr-defined]
    assert built["synthesize"].data == folders["train-cases"]  # type: ignore[attr-defined]
    assert built["synthesize"].autoencoder == folders["autoencoder"]  # type: ignore[attr-defined]
    assert segmenter.synthetic_data == folders["synthesize"] and segmenter.synthesizer is None  # type: ignore[attr-defined]
    assert segmenter.data == folders["normalize"] and segmenter.seed == 3  # type: ignore[attr-defined]
    for name in ("inpainter", "autoencoder", "ldm"):
        assert built[name].preset == preset  # type: ignore[attr-defined]
    with pytest.raises(InputError, match="pipeline preset"):
        PipelineConfig(data=data, out=tmp_path / "run", preset="huge")


@pytest.mark.slow
def test_all_tiny_on_the_phantom_finds_tumors_in_held_out_cases(tmp_path: Path) -> None:
    from d4m.training.phantom import PhantomConfig, write_cohort

    # the demo's cohort: tumours of at least 10 mm (docs/results.md, "d4m-train all")
    write_cohort(tmp_path / "cohort", PhantomConfig(cases=20, seed=0, size="small", min_tumor_mm=10.0,
                                                    write_dicom=False))
    config = PipelineConfig(data=tmp_path / "cohort", out=tmp_path / "run", preset="tiny", device="cpu")
    record = run_pipeline(config)
    assert [s["status"] for s in record["stages"]] == ["done"] * 8
    results = read_json(tmp_path / "run" / "08-evaluate" / "results.json")
    summary = next(iter(results["summary"].values()))
    assert summary["liver_dice"] > 0.9
    assert summary["tumor_dice_global"] > 0.3
    again = run_pipeline(config)
    assert all(s.get("skipped") for s in again["stages"])
    if summary["tumor_dice"] <= 0.5:
        # issue 6's target; this test split measured 0.58 (one thread) and 0.43 (two threads) (docs/results.md)
        pytest.xfail(f"test tumour Dice {summary['tumor_dice']:.3f}: the tiny preset misses the 0.5 target")


def test_cli_all_refuses_a_run_made_with_another_configuration(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from d4m.training.cli import app

    data = _fake_dataset(tmp_path / "data", 5)
    run = tmp_path / "run"
    (run / "01-register").mkdir(parents=True)
    write_json(run / PIPELINE_FILE, {
        "schema_version": 1, "kind": "d4m-pipeline",
        "stages": [{"name": "register", "key": "0" * 64, "status": "done", "config": {"seed": 5}}],
    })
    result = CliRunner().invoke(app, ["-q", "all", "--data", str(data), "--out", str(run), "--seed", "0"])
    assert result.exit_code == 2
    assert "01-register" in result.output and "seed" in result.output and "--overwrite" in result.output
    assert read_json(run / PIPELINE_FILE)["status"] == "failed"
