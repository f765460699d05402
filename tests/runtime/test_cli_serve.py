"""``d4m-infer serve`` and ``d4m-infer status`` as commands: option errors, exit codes, the status views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d4m.runtime.cli import app
from d4m.runtime.spool import Spool, StudyRecord, StudyState, study_key

runner = CliRunner()
UID = "1.2.826.0.1.3680043.8.498.555"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    store = Spool(tmp_path / "spool")
    store.create()
    for n, state in enumerate((StudyState.DONE, StudyState.FAILED, StudyState.RUNNING)):
        uid = f"{UID}.{n}"
        store.store_instance(uid, f"1.2.{n}", b"x")
        store.write(StudyRecord(study_key(uid), uid, state, runs=1, targets=["store"],
                                sent={"store": 1.0} if state is StudyState.DONE else {},
                                error=f"study {study_key(uid)}: expected a PVP series, found none"
                                if state is StudyState.FAILED else None))
    return store.root


def test_status_table_and_json(spool: Path) -> None:
    table = runner.invoke(app, ["status", "--spool", str(spool)])
    assert table.exit_code == 0, table.output
    assert "1 done" in table.output and "1 failed" in table.output and "1 running" in table.output
    assert "1 delivered" in table.output and study_key(f"{UID}.0") in table.output
    assert UID not in table.output
    as_json = runner.invoke(app, ["status", "--spool", str(spool), "--json"])
    summary = json.loads(as_json.output)
    assert summary["counts"]["failed"] == 1 and summary["delivered"] == 1
    assert {row["state"] for row in summary["studies"]} == {"done", "failed", "running"}


def test_status_health_exit_codes(spool: Path) -> None:
    assert runner.invoke(app, ["status", "--spool", str(spool), "--health"]).exit_code == 1
    Spool(spool).write_heartbeat({"listening": True, "ae_title": "D4M", "port": 104})
    result = runner.invoke(app, ["status", "--spool", str(spool), "--health"])
    assert result.exit_code == 0 and "healthy" in result.output


def test_status_of_a_folder_that_is_no_spool_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--spool", str(tmp_path)])
    assert result.exit_code == 2 and "expected a spool folder" in result.output


@pytest.mark.parametrize(("options", "code", "message"), [
    ([], 2, "found neither"),
    (["--send-to", "PACS"], 2, "expected AE@HOST:PORT"),
    (["--send-to", "PACS@127.0.0.1:104", "--ae-title", "THIS_AE_TITLE_IS_TOO_LONG"], 2, "--ae-title"),
    (["--send-to", "PACS@127.0.0.1:104", "--quiet-time", "-1"], 2, "--quiet"),
    (["--send-to", "PACS@127.0.0.1:104"], 3, "bundle"),
])
def test_serve_refuses_bad_options_before_listening(tmp_path: Path, options: list[str], code: int,
                                                    message: str) -> None:
    result = runner.invoke(app, ["serve", "--spool", str(tmp_path / "spool"), "--bundle", str(tmp_path / "none"),
                                 "--port", "0", *options])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "spool" / "heartbeat.json").exists()
