"""The Storage SCP: CT spooled before success; others refused with a status; allow-list; association limit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import infer_testkit as kit
import pydicom
import pytest
import serve_testkit as serve_kit
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.runtime.listener import (
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    Listener,
    ListenerConfig,
)
from d4m.runtime.spool import Spool, study_key


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ct")
    kit.write_tiny_study(root, phases=(Phase.PVP,), shape=(3, 16, 16))
    return sorted(root.rglob("*.dcm"))


class _Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.fail = fail

    def __call__(self, key: str, study_uid: str, new: bool) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.calls.append((key, study_uid, new))


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[Listener, _Recorder]]:
    spool = Spool(tmp_path / "spool")
    spool.create()
    recorder = _Recorder()
    listener = Listener(ListenerConfig(port=0, host="127.0.0.1", allowed=("SENDER",), max_associations=1), spool,
                        recorder)
    listener.start()
    yield listener, recorder
    listener.stop()


def test_ct_instances_are_spooled_before_success_and_resends_change_nothing(
        listening: tuple[Listener, _Recorder], ct_files: list[Path]) -> None:
    listener, recorder = listening
    assert listener.listening and listener.port > 0
    assert serve_kit.send_files(listener.port, ct_files) == [0] * len(ct_files)
    study_uid = str(pydicom.dcmread(ct_files[0]).StudyInstanceUID)
    key = study_key(study_uid)
    spooled = sorted(listener.spool.dicom_dir(key).glob("*.dcm"))
    assert len(spooled) == len(ct_files)
    for path in spooled:
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm" and ds.StudyInstanceUID == study_uid
        assert ds.file_meta.TransferSyntaxUID  # written as a DICOM file with its meta
    assert recorder.calls == [(key, study_uid, True)] * len(ct_files)
    assert serve_kit.send_files(listener.port, ct_files[:1]) == [0]
    assert recorder.calls[-1] == (key, study_uid, False)
    assert listener.spool.instance_count(key) == len(ct_files)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_other_sop_classes_and_broken_instances_are_refused_with_a_status(
        listening: tuple[Listener, _Recorder], ct_files: list[Path], tmp_path: Path) -> None:
    listener, recorder = listening
    seg = serve_kit.tiny_seg_like(tmp_path / "seg.dcm")
    assert serve_kit.send_files(listener.port, [seg]) == [SOP_CLASS_NOT_SUPPORTED]
    no_study = pydicom.dcmread(ct_files[0])
    del no_study.StudyInstanceUID
    bad_uid = pydicom.dcmread(ct_files[1])
    bad_uid.SOPInstanceUID = "1.2.evil"
    assert serve_kit.send_files(listener.port, [no_study, bad_uid]) == [DATASET_MISMATCH, DATASET_MISMATCH]
    assert recorder.calls == []
    assert listener.spool.keys() == []
    ae = AE("SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="D4M")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_callers_off_the_allow_list_are_refused(listening: tuple[Listener, _Recorder],
                                                ct_files: list[Path]) -> None:
    listener, recorder = listening
    assert serve_kit.send_files(listener.port, ct_files, calling="INTRUDER") == []
    assert recorder.calls == [] and listener.spool.keys() == []
    ae = AE("INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="D4M")
    assert assoc.is_rejected and assoc.acceptor.primitive.result_source == 1  # rejected by the service user
    assert assoc.acceptor.primitive.diagnostic == 3  # calling AE title not recognised


def test_associations_past_the_limit_are_refused(listening: tuple[Listener, _Recorder]) -> None:
    listener, _ = listening
    first = AE("SENDER")
    first.add_requested_context(Verification)
    held = first.associate("127.0.0.1", listener.port, ae_title="D4M")
    assert held.is_established
    try:
        second = AE("SENDER")
        second.add_requested_context(Verification)
        refused = second.associate("127.0.0.1", listener.port, ae_title="D4M")
        assert refused.is_rejected
        assert refused.acceptor.primitive.result == 2  # transient: try again later
    finally:
        held.release()


def test_a_failing_disk_answers_out_of_resources(tmp_path: Path, ct_files: list[Path]) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    listener = Listener(ListenerConfig(port=0, host="127.0.0.1"), spool, _Recorder(fail=True))
    listener.start()
    try:
        assert serve_kit.send_files(listener.port, ct_files[:1]) == [OUT_OF_RESOURCES]
    finally:
        listener.stop()
    assert not listener.listening


def test_stop_frees_the_port_for_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    first = Listener(ListenerConfig(port=0, host="127.0.0.1"), spool, _Recorder())
    first.start()
    port = first.port
    clash = Listener(ListenerConfig(port=port, host="127.0.0.1"), spool, _Recorder())
    with pytest.raises(InputError, match=f"--port {port}: expected a free port"):
        clash.start()
    first.stop()
    again = Listener(ListenerConfig(port=port, host="127.0.0.1"), spool, _Recorder())
    again.start()
    assert again.listening and threading.active_count() > 1
    again.stop()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ae_title": "A" * 17}, "--ae-title"), ({"ae_title": "BAD\\AE"}, "--ae-title"), ({"allowed": ("",)}, "--allow"),
    ({"port": 70000}, "--port"), ({"max_associations": 0}, "--max-associations"),
])
def test_listener_config_refuses_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ListenerConfig(**kwargs)  # type: ignore[arg-type]
