"""The study spool: durable writes, study keys, state files, status and the heartbeat check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import write_bytes
from d4m.runtime.spool import (
    HEARTBEAT_FILE,
    Spool,
    StudyRecord,
    StudyState,
    is_uid,
    study_key,
)

UID = "1.2.826.0.1.3680043.8.498.1234567890"


def test_study_key_is_short_stable_and_does_not_show_the_uid() -> None:
    key = study_key(UID)
    assert key == study_key(UID)
    assert len(key) == 16 and int(key, 16) >= 0
    assert key != study_key(UID + "1")
    assert "1234567890" not in key


@pytest.mark.parametrize(("value", "ok"), [(UID, True), ("1.2", True), ("", False), ("../../etc/passwd", False),
                                           ("1." * 40 + "1", False), ("1.2.a", False), ("1..2", False)])
def test_is_uid_accepts_only_dicom_uids(value: str, ok: bool) -> None:
    assert is_uid(value) is ok


def test_durable_write_replaces_and_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"
    write_bytes(target, b"one", durable=True)
    write_bytes(target, b"two", durable=True)
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_store_instance_is_idempotent_and_refuses_malformed_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    key, new = spool.store_instance(UID, "1.2.3.4", b"first")
    assert (key, new) == (study_key(UID), True)
    assert spool.store_instance(UID, "1.2.3.4", b"second") == (key, False)
    assert (spool.dicom_dir(key) / "1.2.3.4.dcm").read_bytes() == b"first"
    assert spool.instance_count(key) == 1
    with pytest.raises(InputError, match="malformed"):
        spool.store_instance(UID, "../evil", b"x")
    assert sorted(p.name for p in spool.dicom_dir(key).iterdir()) == ["1.2.3.4.dcm"]


def test_state_file_round_trip_and_validation(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    record = StudyRecord(study_key(UID), UID, StudyState.DONE, runs=2, targets=["store"], sent={"store": 1.0},
                         tumor_count=3)
    spool.write(record)
    again = spool.read(record.key)
    assert again == record and again.delivered
    path = spool.study_dir(record.key) / "state.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"state.json: expected schema_version 1, found 99"):
        spool.read(record.key)
    data["schema_version"], data["surprise"] = 1, True
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="surprise"):
        spool.read(record.key)
    assert spool.read("0" * 16) is None


def test_scrub_replaces_the_study_uid_by_the_key() -> None:
    record = StudyRecord(study_key(UID), UID)
    assert record.scrub(f"study {UID}: expected CT") == f"study study {record.key}: expected CT"
    assert UID not in record.scrub(f"{UID} and {UID}")


def test_status_counts_states_and_deliveries(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    states = [(StudyState.DONE, ["store"], {"store": 1.0}), (StudyState.DONE, ["store", "folder"], {"store": 1.0}),
              (StudyState.FAILED, [], {}), (StudyState.RECEIVED, [], {})]
    for n, (state, targets, sent) in enumerate(states):
        uid = f"{UID}.{n}"
        spool.store_instance(uid, f"1.2.{n}", b"x")
        spool.write(StudyRecord(study_key(uid), uid, state, targets=targets, sent=sent))
    summary = spool.status()
    assert summary["counts"] == {"received": 1, "queued": 0, "running": 0, "done": 2, "failed": 1}
    assert summary["delivered"] == 1
    assert all(row["instances"] == 1 for row in summary["studies"])
    assert UID not in json.dumps(summary)
    with pytest.raises(InputError, match="expected a spool folder"):
        Spool(tmp_path / "nothing").status()


def test_health_follows_the_heartbeat(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ok, why = spool.healthy(30)
    assert not ok and HEARTBEAT_FILE in why
    spool.write_heartbeat({"listening": True, "ae_title": "D4M", "port": 104})
    ok, why = spool.healthy(30)
    assert ok and "D4M" in why
    data = json.loads((tmp_path / HEARTBEAT_FILE).read_text())
    data["time"] = time.time() - 100
    (tmp_path / HEARTBEAT_FILE).write_text(json.dumps(data))
    ok, why = spool.healthy(30)
    assert not ok and "old" in why
    spool.write_heartbeat({"listening": False})
    assert not spool.healthy(30)[0]
