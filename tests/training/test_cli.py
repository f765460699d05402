"""d4m-train's commands through Typer's runner: exit codes and outputs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from d4m.training.cli import app
from d4m.training.datasets import load_dataset

runner = CliRunner()


def test_phantom_writes_a_loadable_cohort_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    args = ["-q", "phantom", "--out", str(out), "--cases", "1", "--seed", "3", "--no-dicom", "--preview"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    dataset = load_dataset(out)
    assert [c.id for c in dataset.cases] == ["case_000"]
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "existing one" in again.output


def test_phantom_options_reach_the_cohort_config(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    result = runner.invoke(app, ["-q", "phantom", "--out", str(out), "--cases", "1", "--no-dicom", "--min-tumor-mm",
                                 "12", "--max-tumor-mm", "20", "--max-tumors", "2", "--tumor-free-fraction", "0",
                                 "--tumor-kind", "hcc", "--noise-scale", "1.5"])
    assert result.exit_code == 0, result.output
    dataset = load_dataset(out)
    config = dataset.source["config"]
    assert (config["min_tumor_mm"], config["max_tumor_mm"], config["max_tumors"]) == (12.0, 20.0, 2)
    assert (config["tumor_kinds"], config["noise_scale"]) == (["hcc"], 1.5)
    tumors = dataset.cases[0].meta["tumors"]
    assert 1 <= len(tumors) <= 2 and all(t["type"] == "hcc" and 12 <= t["diameter_mm"] <= 20 for t in tumors)
    refused = runner.invoke(app, ["-q", "phantom", "--out", str(tmp_path / "x"), "--tumor-kind", "polyp"])
    assert refused.exit_code == 2 and "tumour kinds" in refused.output


def test_register_runs_on_a_phantom_cohort(tmp_path: Path) -> None:
    made = runner.invoke(app, ["-q", "phantom", "--out", str(tmp_path / "c"), "--cases", "1", "--no-dicom"])
    assert made.exit_code == 0
    result = runner.invoke(app, ["-q", "register", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "registration_summary.json").read_text())
    assert summary
    assert len(load_dataset(tmp_path / "r")) == 1


def test_bad_dataset_is_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text("{broken")
    result = runner.invoke(app, ["register", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "expected valid JSON" in result.output


def test_every_stage_command_is_listed() -> None:
    output = runner.invoke(app, ["--help"]).output
    for command in ("phantom", "register", "inpainter", "normalize", "autoencoder", "ldm", "synthesize",
                    "segmenter", "postprocess", "evaluate"):
        assert command in output


def test_rules_synthesis_from_the_cli(tmp_path: Path) -> None:
    assert runner.invoke(app, ["-q", "phantom", "--out", str(tmp_path / "c"), "--cases", "1", "--seed", "2",
                               "--no-dicom"]).exit_code == 0
    assert runner.invoke(app, ["-q", "register", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r")]
                         ).exit_code == 0
    result = runner.invoke(app, ["-q", "synthesize", "--data", str(tmp_path / "r"), "--out", str(tmp_path / "s"),
                                 "--synthesizer", "rules"])
    assert result.exit_code == 0, result.output
    synthetic = load_dataset(tmp_path / "s")
    assert len(synthetic) == 1
    assert (synthetic.cases[0].read_label().array == 2).any()


def test_segmenter_with_a_bad_option_is_exit_code_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["-q", "phantom", "--out", str(tmp_path / "c"), "--cases", "1", "--no-dicom"]
                         ).exit_code == 0
    for option, value in (("--data-fraction", "7"), ("--lr", "0"), ("--warmup-steps", "-1")):
        result = runner.invoke(app, ["segmenter", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "run"),
                                     option, value], terminal_width=300)
        assert result.exit_code == 2, option
        assert "segmenter options: expected valid values" in " ".join(result.output.split()), option
    assert not (tmp_path / "run").exists()


def test_evaluate_with_an_unknown_phase_set_is_exit_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path), "--out", str(tmp_path / "eval"),
                                 "--phases", "PVP+XYZ"], terminal_width=300)
    assert result.exit_code == 2
    assert "--phases: expected sets of NC, ART, PVP, DEL joined by '+'" in " ".join(result.output.split())
    assert not (tmp_path / "eval").exists()


def test_postprocess_refuses_the_test_split(tmp_path: Path) -> None:
    result = runner.invoke(app, ["postprocess", "--model", str(tmp_path), "--split", "test"], terminal_width=300)
    assert result.exit_code == 2
    assert "--split: expected train, val or all (never the test cases)" in " ".join(result.output.split())
    assert not (tmp_path / "postprocess.json").exists()
