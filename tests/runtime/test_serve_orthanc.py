"""``d4m-infer serve`` against a real PACS: Orthanc on loopback sends studies, the SEG comes back into it.

Each test starts its own Orthanc (temporary storage, free ports, a ``DicomModalities`` entry
pointing at the listener) and ``d4m-infer serve`` as a subprocess, and removes both at the end.
Skipped without Orthanc and dcmtk (``apt-get install orthanc dcmtk``), failed under ``CI=true``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import infer_testkit as kit
import numpy as np
import pydicom
import pytest
import serve_testkit as serve_kit
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.reader import read_series_datasets
from d4m.dicom_io.seg_writer import write_seg
from d4m.dicom_io.series import scan_folder
from d4m.runtime.spool import Spool, study_key

SECRETS = (kit.PATIENT_NAME, kit.PATIENT_ID, kit.ACCESSION, "SECRET")
D4M_CLI = Path(sys.executable).with_name("d4m-infer")
#: Generous: two cores shared with other work; a tiny study takes ~5 s when the machine is idle.
SEG_TIMEOUT = 150.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Orthanc:
    """An Orthanc server on loopback with its own storage; ``d4m`` is a DICOM modality it can send to."""

    def __init__(self, binary: str, root: Path, d4m_port: int) -> None:
        self.root = root
        self.http_port, self.dicom_port = _free_port(), _free_port()
        config = {
            "Name": "d4m-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [], "LuaScripts": [],
            "DicomModalities": {"d4m": ["D4M", "127.0.0.1", d4m_port]}, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "ConcurrentJobs": 4, "WebDavEnabled": False,
            "OrthancExplorerEnabled": False, "DicomScuTimeout": 30,
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(json.dumps(config))
        self._log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if not serve_kit.wait_until(self._up, 30, 0.2):
            self.close()
            raise RuntimeError(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            return "Version" in self.get("/system")
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None
                ) -> tuple[int, Any]:
        """One REST call; returns (HTTP status, decoded JSON or text)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                code, text = response.status, response.read()
        except urllib.error.HTTPError as exc:
            code, text = exc.code, exc.read()
        try:
            return code, json.loads(text)
        except ValueError:
            return code, text

    def get(self, path: str) -> Any:
        code, value = self.request("GET", path)
        assert code == 200, (path, code, value)
        return value

    def upload(self, files: list[Path]) -> list[dict[str, Any]]:
        """POST each file to /instances; returns Orthanc's answers (ID, ParentStudy, ...)."""
        answers = []
        for path in files:
            code, value = self.request("POST", "/instances", path.read_bytes())
            assert code == 200 and value["Status"] in ("Success", "AlreadyStored"), value
            answers.append(value)
        return answers

    def send_to_d4m(self, resources: list[str], asynchronous: bool = False) -> tuple[int, Any]:
        """C-STORE studies/instances to the d4m modality (Orthanc's /modalities/d4m/store)."""
        body: dict[str, Any] = {"Resources": resources}
        body["Asynchronous" if asynchronous else "Synchronous"] = True
        return self.request("POST", "/modalities/d4m/store", body)

    def seg_instances(self, study_uid: str) -> list[str]:
        """Orthanc IDs of the SEG instances of a study (a REST query)."""
        code, series = self.request("POST", "/tools/find", {"Level": "Series", "Expand": True,
                                                            "Query": {"StudyInstanceUID": study_uid,
                                                                      "Modality": "SEG"}})
        assert code == 200, series
        return [instance for item in series for instance in item["Instances"]]

    def close(self) -> None:
        """Kill the server (its storage is thrown away, so no clean shutdown is needed) and remove the storage."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(15)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class Serve:
    """``d4m-infer serve`` as a subprocess sending its SEGs to Orthanc."""

    def __init__(self, spool: Path, bundle: Path, port: int, orthanc: Orthanc, log: Path, *extra: str) -> None:
        self.spool, self.log = spool, log
        command = [str(D4M_CLI), "-v", "serve", "--spool", str(spool), "--bundle", str(bundle),
                   "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--host", "127.0.0.1",
                   "--port", str(port), "--allow", "ORTHANC", "--quiet-time", "2", "--threads", "1",
                   "--retry-delay", "0.5", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()/kill9()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        ready = serve_kit.wait_until(self._ready, 90, 0.2)
        if not ready:
            self.stop()
            raise RuntimeError(f"d4m-infer serve did not start: {log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        beat = Spool(self.spool).read_heartbeat()
        return self.process.poll() is None and beat is not None and beat.get("pid") == self.process.pid \
            and bool(beat.get("listening"))

    def kill9(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return int(self.process.returncode)

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.spool / "studies" / key / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None



@pytest.fixture
def pacs(require_tool: Callable[[str], str], tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    """Orthanc, and the port the d4m listener is to use."""
    binary = require_tool("Orthanc")
    d4m_port = _free_port()
    orthanc = Orthanc(binary, tmp_path / "orthanc", d4m_port)
    yield orthanc, d4m_port
    orthanc.close()


@pytest.fixture
def launch(pacs: tuple[Orthanc, int], bundle: Path, tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Start ``d4m-infer serve`` on the spool ``tmp_path/spool`` (again after a kill); all stopped at the end."""
    orthanc, port = pacs
    started: list[Serve] = []

    def start(*extra: str) -> Serve:
        server = Serve(tmp_path / "spool", bundle, port, orthanc, tmp_path / "serve.log", *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop()


def _study(folder: Path, phases: tuple[Phase, ...] = (Phase.NC, Phase.PVP), encodings: dict[Phase, str] | None = None
           ) -> tuple[str, dict[Phase, list[Path]]]:
    folders = kit.write_tiny_study(folder, phases=phases, encodings=encodings)
    files = {phase: sorted(path.glob("*.dcm")) for phase, path in folders.items()}
    return str(pydicom.dcmread(files[phases[0]][0]).StudyInstanceUID), files


def _wait_for_seg(orthanc: Orthanc, study_uid: str, server: Serve | None = None) -> list[str]:
    def arrived() -> bool:
        if server is not None and server.process.poll() is not None:
            raise AssertionError(f"d4m-infer serve exited: {server.log.read_text()[-3000:]}")
        return bool(orthanc.seg_instances(study_uid))

    assert serve_kit.wait_until(arrived, SEG_TIMEOUT, 0.5), "no SEG arrived in Orthanc"
    return orthanc.seg_instances(study_uid)


def _c_find_segs(orthanc: Orthanc, study_uid: str) -> int:
    """Count the SEG series of a study in Orthanc by DICOM C-FIND (calling as the d4m modality)."""
    ae = AE("D4M")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.Modality = "SERIES", study_uid, "SEG"
    query.SeriesInstanceUID = ""
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        matches = [ds for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                   if status is not None and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()
    return len(matches)


def _status_cli(spool: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(D4M_CLI), "status", "--spool", str(spool), *options], capture_output=True, text=True,
                          timeout=60, check=False)


def test_orthanc_sends_a_study_and_the_seg_comes_back(launch: Callable[..., Serve], pacs: tuple[Orthanc, int],
                                                      tmp_path: Path) -> None:
    orthanc, _ = pacs
    server = launch()
    uid, files = _study(tmp_path / "study", encodings={Phase.NC: "jpeg-ls"})  # one series travels compressed
    answers = orthanc.upload([f for group in files.values() for f in group])
    code, result = orthanc.send_to_d4m([answers[0]["ParentStudy"]])
    assert code == 200 and result["InstancesCount"] == 24 and result["FailedInstancesCount"] == 0, result
    [seg_id] = _wait_for_seg(orthanc, uid, server)
    assert serve_kit.wait_until(lambda: bool((server.record(study_key(uid)) or {}).get("sent")), 30)
    assert _c_find_segs(orthanc, uid) == 1
    code, raw = orthanc.request("GET", f"/instances/{seg_id}/file")
    seg = pydicom.dcmread(io.BytesIO(raw))
    pvp_series = str(pydicom.dcmread(files[Phase.PVP][0]).SeriesInstanceUID)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == uid
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [pvp_series]
    assert seg.NumberOfFrames == 2 * len(files[Phase.PVP])  # binary, every frame, two segments
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for p in Spool(server.spool).dicom_dir(study_key(uid)).glob("*.dcm")}
    assert syntaxes == {JPEGLSLossless, ExplicitVRLittleEndian}  # spooled as sent, decoded by the pipeline
    health = _status_cli(server.spool, "--health")
    assert health.returncode == 0 and "healthy" in health.stdout
    summary = json.loads(_status_cli(server.spool, "--json").stdout)
    assert summary["counts"]["done"] == 1 and summary["delivered"] == 1
    assert summary["studies"][0]["study"] == study_key(uid) and summary["studies"][0]["instances"] == 24
    assert server.stop() == 0
    assert _status_cli(server.spool, "--health").returncode == 1
    log = server.log.read_text()
    assert f"study {study_key(uid)}: delivered (store)" in log
    for secret in (*SECRETS, uid):
        assert secret not in log


def test_non_ct_objects_and_unknown_callers_are_refused_without_harm(
        launch: Callable[..., Serve], pacs: tuple[Orthanc, int], tmp_path: Path,
        require_tool: Callable[[str], str]) -> None:
    orthanc, port = pacs
    storescu = require_tool("storescu")
    server = launch()
    uid, files = _study(tmp_path / "study", phases=(Phase.PVP,))
    source = read_series_datasets(next(iter(scan_folder(tmp_path / "study").studies[uid].series.values())))
    labels = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    labels[2:5, 10:20, 10:20] = 1
    seg = write_seg(labels, source, tmp_path / "seg.dcm")
    [answer] = orthanc.upload([seg])
    code, result = orthanc.send_to_d4m([answer["ID"]])
    assert code != 200, result  # Orthanc reports the refused C-STORE as a failed job
    intruder = subprocess.run([storescu, "-aet", "INTRUDER", "-aec", "D4M", "127.0.0.1", str(port),
                               str(files[Phase.PVP][0])], capture_output=True, text=True, timeout=60, check=False)
    assert intruder.returncode != 0 and "Association Rejected" in intruder.stdout + intruder.stderr
    assert Spool(server.spool).keys() == []  # nothing spooled from either
    code, _ = orthanc.request("POST", "/modalities/d4m/echo", {})
    assert code == 200  # the listener is unharmed
    assert _status_cli(server.spool, "--health").returncode == 0
    log = server.log.read_text()
    assert "refused a Segmentation Storage instance from ORTHANC" in log and "INTRUDER" in log


@pytest.mark.slow
def test_kill_9_halfway_through_a_study_then_restart_delivers_once(
        launch: Callable[..., Serve], pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    orthanc, _ = pacs
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    ordered = files[Phase.NC] + files[Phase.PVP]
    ids = [a["ID"] for a in orthanc.upload(ordered)]
    half = len(ids) // 2
    server = launch("--quiet-time", "6")
    code, result = orthanc.send_to_d4m(ids[:half])
    assert code == 200 and result["InstancesCount"] == half
    assert Spool(server.spool).instance_count(key) == half  # acknowledged means spooled
    server.kill9()
    assert server.record(key)["state"] == "received"
    server = launch("--quiet-time", "6")
    code, result = orthanc.send_to_d4m(ids[half:])
    assert code == 200
    [seg_id] = _wait_for_seg(orthanc, uid, server)
    assert serve_kit.wait_until(lambda: bool((server.record(key) or {}).get("sent")), 30)
    record = server.record(key)
    assert record["runs"] == 1 and set(record["sent"]) == {"store"}
    assert Spool(server.spool).instance_count(key) == len(ids)
    code, raw = orthanc.request("GET", f"/instances/{seg_id}/file")
    seg = pydicom.dcmread(io.BytesIO(raw))
    assert seg.NumberOfFrames == 2 * len(files[Phase.PVP])  # made from the whole study, not the first half
    assert not serve_kit.wait_until(lambda: len(orthanc.seg_instances(uid)) > 1, 3)


@pytest.mark.slow
def test_kill_9_while_running_then_restart_delivers_once(
        launch: Callable[..., Serve], pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    orthanc, _ = pacs
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    answers = orthanc.upload([f for group in files.values() for f in group])
    server = launch("--quiet-time", "1")
    assert orthanc.send_to_d4m([answers[0]["ParentStudy"]])[0] == 200
    assert serve_kit.wait_until(lambda: (server.record(key) or {}).get("state") == "running", 60, 0.02)
    server.kill9()
    assert server.record(key)["state"] == "running" and orthanc.seg_instances(uid) == []
    server = launch("--quiet-time", "1")
    _wait_for_seg(orthanc, uid, server)
    assert serve_kit.wait_until(lambda: bool((server.record(key) or {}).get("sent")), 30)
    record = server.record(key)
    assert record["runs"] == 2 and record["state"] == "done"
    server.stop()
    server = launch("--quiet-time", "1")  # a third start owes nothing
    assert not serve_kit.wait_until(lambda: len(orthanc.seg_instances(uid)) > 1, 4)
    assert server.record(key)["runs"] == 2
    assert "run 1 was interrupted" in server.log.read_text()


@pytest.mark.slow
def test_three_studies_arriving_at_once_each_get_one_seg(
        launch: Callable[..., Serve], pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    orthanc, _ = pacs
    studies = {}
    for n in range(3):
        uid, files = _study(tmp_path / f"study{n}", phases=(Phase.PVP,))
        studies[uid] = orthanc.upload(files[Phase.PVP])[0]["ParentStudy"]
    server = launch("--quiet-time", "2", "--max-associations", "4", "--workers", "2")
    results: list[tuple[int, Any]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(orthanc.send_to_d4m([s])))
               for s in studies.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [code for code, _ in results] == [200, 200, 200], results
    for uid in studies:
        assert len(_wait_for_seg(orthanc, uid, server)) == 1
        assert serve_kit.wait_until(lambda uid=uid: bool((server.record(study_key(uid)) or {}).get("sent")), 30)
    summary = json.loads(_status_cli(server.spool, "--json").stdout)
    assert summary["counts"]["done"] == 3 and summary["delivered"] == 3
    assert {row["study"] for row in summary["studies"]} == {study_key(uid) for uid in studies}
