"""``d4m-infer serve``: the listener, the quiet-time scheduler, a bounded worker queue and delivery, on one spool.

Threads in one process:

- the **listener** (:mod:`d4m.runtime.listener`) spools instances and calls :meth:`Service.instance_arrived`;
- the **scheduler** wakes every ``tick_seconds``: it queues a ``received`` study once no new
  instance arrived for ``quiet_seconds``, queues deliveries still owed, and writes the heartbeat;
- ``workers`` **workers** take studies from a queue of at most ``queue_size`` entries (studies
  ready beyond that wait as ``received``) and run :func:`d4m.runtime.infer.run` on the spooled
  folder, then deliver (:mod:`d4m.runtime.delivery`).

**Restart.** :meth:`Service.start` reads every state file first: a ``received`` study gets a
fresh quiet time (its sender may still be sending), ``queued`` and interrupted ``running``
studies are queued again (a study whose runs were interrupted ``max_runs`` times is marked
failed: it may be what kills the process), a ``done`` study owed a delivery is delivered, and a
failed delivery is tried again. A ``done`` study is never run again, and a target recorded as
delivered is never sent again; the only window for a duplicate is between the destination's
success answer and the ``fsync`` of the state file, and the duplicate then carries the same
SOPInstanceUID, which a PACS stores once.

**Changed studies.** An instance not seen before, arriving while a study runs, makes the run's
result stale: the study goes back to ``received`` and runs again once quiet.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from d4m.dicom_io.codes import SegType
from d4m.dicom_io.errors import D4MError, InputError
from d4m.runtime.bundle import load_bundle
from d4m.runtime.delivery import (
    DeliveryError,
    Destination,
    RetryPolicy,
    StopRequested,
    copy_result,
    send_with_retries,
)
from d4m.runtime.infer import SEG_FILE, InferConfig
from d4m.runtime.infer import run as run_inference
from d4m.runtime.listener import Listener, ListenerConfig
from d4m.runtime.runners import Device
from d4m.runtime.spool import Spool, StudyRecord, StudyState

logger = logging.getLogger(__name__)

STORE = "store"
FOLDER = "folder"
_INFER = "infer"
_DELIVER = "deliver"


@dataclass(frozen=True)
class ServeConfig:
    """The options of ``d4m-infer serve`` (frozen, validated, data only).

    Attributes
    ----------
    spool
        The spool folder (instances, study states, results, heartbeat).
    bundle
        The model bundle (verified once at start; each run verifies it again).
    listener
        AE title, port, allow-list, association limit.
    destination
        Where each SEG is sent by C-STORE; ``None``: not sent.
    output
        A folder receiving ``<study key>/`` with the result files; ``None``: none.
    quiet_seconds
        A study starts when no new instance arrived for this long.
    workers
        Studies segmented at once.
    queue_size
        Studies waiting for a worker at most (more stay ``received``).
    retry
        C-STORE attempts and back-off.
    max_runs
        Runs of one study (interrupted by a crash) before it is marked failed.
    redeliver_seconds
        A failed delivery is tried again after this long (and at every restart).
    keep_hours
        A finished study (delivered, or refused by inference) leaves the spool this many hours
        after it finished; 0 keeps it. A study sent again after that is segmented again.
    device, threads, seg_format
        As for ``d4m-infer run``.
    heartbeat_seconds
        How often the heartbeat file is written.
    tick_seconds
        How often the scheduler looks at the studies.
    """

    spool: Path
    bundle: Path
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    destination: Destination | None = None
    output: Path | None = None
    quiet_seconds: float = 30.0
    workers: int = 1
    queue_size: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_runs: int = 3
    redeliver_seconds: float = 600.0
    keep_hours: float = 168.0
    device: Device = Device.AUTO
    threads: int | None = None
    seg_format: SegType = SegType.BINARY
    heartbeat_seconds: float = 5.0
    tick_seconds: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "spool", Path(self.spool))
        object.__setattr__(self, "bundle", Path(self.bundle))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.destination is None and self.output is None:
            raise InputError("serve: expected a destination (--send-to AE@HOST:PORT) or an output folder (--out), "
                             "found neither")
        checks = {"--quiet": (self.quiet_seconds, 0), "--workers": (self.workers, 1),
                  "--queue-size": (self.queue_size, 1), "--max-runs": (self.max_runs, 1),
                  "redeliver seconds": (self.redeliver_seconds, 0), "--keep-hours": (self.keep_hours, 0),
                  "heartbeat seconds": (self.heartbeat_seconds, 0.1),
                  "tick seconds": (self.tick_seconds, 0.01)}
        for option, (value, least) in checks.items():
            if value < least:
                raise InputError(f"{option}: expected at least {least}, found {value}")
        spool = self.spool.resolve()
        if self.output is not None and self.output.resolve().is_relative_to(spool):
            raise InputError(f"{self.output}: expected an output folder outside the spool, found it inside")

    @property
    def targets(self) -> list[str]:
        """The delivery targets configured: ``store``, ``folder`` or both."""
        return [name for name, on in ((STORE, self.destination is not None), (FOLDER, self.output is not None))
                if on]


class Service:
    """The running listener, scheduler and workers on one spool (:meth:`start`, :meth:`stop`)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.listener = Listener(config.listener, self.spool, self.instance_arrived)
        self._lock = threading.Lock()
        self._records: dict[str, StudyRecord] = {}
        self._arrival: dict[str, float] = {}  # monotonic time of the last new instance
        self._generation: dict[str, int] = {}  # bumped on each new instance
        self._delivering: set[str] = set()
        self._abandoned: set[str] = set()  # runs left behind by stop(): their results are not recorded
        self._redeliver_now: set[str] = set()
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._last_heartbeat = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Check the bundle, recover the spool, listen, and start the scheduler and the workers.

        Raises
        ------
        InputError
            The spool cannot be written or the port cannot be bound.
        BundleError
            The bundle is missing or does not verify.
        """
        self.spool.create()
        self.spool.empty_trash()
        with load_bundle(self.config.bundle) as bundle:
            logger.info("bundle %s verified (sha256 %s…)", self.config.bundle.name, bundle.sha256[:12])
        self._recover()
        self.listener.start()
        self._started = time.time()
        self._threads = [threading.Thread(target=self._schedule, name="d4m-scheduler", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"d4m-worker-{n}", daemon=True)
                          for n in range(self.config.workers)]
        for thread in self._threads:
            thread.start()
        self._heartbeat()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; let the workers finish what they run for up to ``timeout`` seconds.

        A study still running after that goes back to ``received`` without counting the run (a
        shutdown is not a crash) and is segmented at the next start; the left-behind run records
        nothing. Keep ``timeout`` under the container's stop grace period (Docker: 10 s). A second
        call does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.listener.stop()
        for _ in range(self.config.workers):
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for key, record in self._records.items():
                if record.state is StudyState.RUNNING:
                    record.state, record.runs = StudyState.RECEIVED, max(0, record.runs - 1)
                    self.spool.write(record)
                    self._abandoned.add(key)
                    logger.warning("study %s: stopped while running; it runs again at the next start", key)
        self._write_heartbeat(listening=False)
        logger.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`request_stop` (or ``timeout``); ``True`` when a stop was requested."""
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (signal handlers call this)."""
        self._stop.set()

    @property
    def healthy(self) -> bool:
        """Listener serving, scheduler and every worker alive."""
        return self.listener.listening and all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def studies(self) -> dict[str, StudyRecord]:
        """A snapshot of the study states (key → record copy)."""
        with self._lock:
            return {key: StudyRecord(**{**vars(rec), "sent": dict(rec.sent), "targets": list(rec.targets)})
                    for key, rec in self._records.items()}

    # ------------------------------------------------------------------ the listener's callback

    def instance_arrived(self, key: str, study_uid: str, new: bool) -> None:
        """Record an instance spooled for study ``key`` (called before the sender is answered).

        Raises
        ------
        OSError
            The state file cannot be written (the listener answers "out of resources").
        """
        now = time.time()
        with self._lock:
            record = self._records.get(key)
            if record is None:
                record = StudyRecord(key, study_uid, StudyState.RECEIVED, first_received=now, last_received=now)
                self.spool.write(record)
                self._records[key] = record
                logger.info("study %s: receiving", key)
            if not new:
                return
            record.last_received = now
            self._arrival[key] = time.monotonic()
            self._generation[key] = self._generation.get(key, 0) + 1
            if record.state in (StudyState.QUEUED, StudyState.DONE, StudyState.FAILED):
                if record.state is not StudyState.QUEUED:
                    logger.warning("study %s: new instances after it was %s: it will be segmented again", key,
                                   record.state.value)
                self._reset(record)
                self.spool.write(record)

    @staticmethod
    def _reset(record: StudyRecord) -> None:
        """Back to ``received`` for a new round (the earlier result no longer describes the study)."""
        record.state = StudyState.RECEIVED
        record.runs = 0
        record.stage = record.error = record.exit_code = None
        record.sent, record.targets, record.delivery_attempts = {}, [], 0

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Load the spool's studies and decide what each one needs (module docstring, "Restart")."""
        ready = time.monotonic() - self.config.quiet_seconds
        for key in self.spool.keys():
            try:
                record = self.spool.read(key)
            except InputError as exc:
                logger.error("study %s: state file unreadable, left alone: %s", key, exc)
                continue
            if record is None:
                record = self._record_from_instances(key)
                if record is None:
                    continue
            self._records[key] = record
            state = record.state
            if state is StudyState.RECEIVED:
                self._arrival[key] = time.monotonic()
            elif state in (StudyState.QUEUED, StudyState.RUNNING):
                if state is StudyState.RUNNING:
                    logger.warning("study %s: run %d was interrupted; resuming", key, record.runs)
                if record.runs >= self.config.max_runs:
                    self._fail(record, "inference", 1, f"gave up after {record.runs} interrupted run(s)")
                    continue
                record.state = StudyState.RECEIVED
                self._arrival[key] = ready
                self.spool.write(record)
            elif state is StudyState.FAILED and record.stage == "delivery":
                self._redeliver_now.add(key)
        counts: dict[str, int] = {}
        for record in self._records.values():
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
        if counts:
            logger.info("spool: %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))

    def _record_from_instances(self, key: str) -> StudyRecord | None:
        """A state for instances spooled just before a crash, before their state file was written."""
        files = sorted(self.spool.dicom_dir(key).glob("*.dcm"))
        for path in files:
            try:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID", ""))
            except (OSError, InvalidDicomError, ValueError) as exc:
                logger.warning("study %s: unreadable spooled file skipped: %s", key, type(exc).__name__)
                continue
            now = time.time()
            record = StudyRecord(key, uid, StudyState.RECEIVED, first_received=now, last_received=now)
            self.spool.write(record)
            self._arrival[key] = time.monotonic()
            return record
        return None

    # ------------------------------------------------------------------ scheduler

    def _schedule(self) -> None:
        while not self._stop.wait(self.config.tick_seconds):
            try:
                self._schedule_once()
                if time.monotonic() - self._last_heartbeat >= self.config.heartbeat_seconds:
                    self._heartbeat()
            except OSError as exc:  # a full or failing disk must not end the scheduler: log and retry
                logger.error("scheduler: %s", exc)

    def _schedule_once(self) -> None:
        now = time.monotonic()
        removed: list[tuple[str, Path]] = []
        with self._lock:
            for key, record in list(self._records.items()):
                if self._expired(record):
                    removed.append((key, self.spool.discard(key)))
                    del self._records[key]
                    self._arrival.pop(key, None)
                    self._generation.pop(key, None)
                elif self._queue.full():
                    continue
                elif record.state is StudyState.RECEIVED and now - self._arrival.get(key, 0.0) >= \
                        self.config.quiet_seconds:
                    record.state = StudyState.QUEUED
                    self.spool.write(record)
                    self._queue.put_nowait((_INFER, key))
                    logger.info("study %s: %d instance(s), quiet for %.0f s: queued", key,
                                self.spool.instance_count(key), self.config.quiet_seconds)
                elif key not in self._delivering and self._owes_delivery(record):
                    self._delivering.add(key)
                    self._redeliver_now.discard(key)
                    self._queue.put_nowait((_DELIVER, key))
        for key, trash in removed:
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("study %s: removed from the spool %g h after it finished", key, self.config.keep_hours)

    def _expired(self, record: StudyRecord) -> bool:
        """Finished (delivered, or refused by inference) longer ago than ``keep_hours``."""
        finished = record.delivered or (record.state is StudyState.FAILED and record.stage == "inference")
        return bool(self.config.keep_hours) and finished and record.key not in self._delivering and \
            time.time() - record.updated > self.config.keep_hours * 3600.0

    def _owes_delivery(self, record: StudyRecord) -> bool:
        if record.state is StudyState.DONE:
            return not set(self.config.targets) <= set(record.sent)
        if record.state is StudyState.FAILED and record.stage == "delivery":
            return record.key in self._redeliver_now or time.time() - record.updated >= \
                self.config.redeliver_seconds
        return False

    def _heartbeat(self) -> None:
        self._write_heartbeat(listening=self.healthy)

    def _write_heartbeat(self, listening: bool) -> None:
        with self._lock:
            counts: dict[str, int] = {}
            for record in self._records.values():
                counts[record.state.value] = counts.get(record.state.value, 0) + 1
        self.spool.write_heartbeat({"pid": os.getpid(), "ae_title": self.config.listener.ae_title,
                                    "port": self.listener.port, "listening": listening, "started": self._started,
                                    "workers": self.config.workers, "queued": self._queue.qsize(),
                                    "counts": counts})
        self._last_heartbeat = time.monotonic()

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            task, key = item
            try:
                if task == _INFER:
                    self._infer(key)
                else:
                    self._deliver(key)
            except OSError as exc:  # the spool's disk failed: the study stays where it was, a restart resumes it
                logger.error("study %s: %s failed: %s", key, task, exc)
            finally:
                if task == _DELIVER:
                    with self._lock:
                        self._delivering.discard(key)

    def _infer(self, key: str) -> None:
        with self._lock:
            record = self._records[key]
            if record.state is not StudyState.QUEUED:
                return  # changed while queued (new instances): the scheduler queues it again
            if record.runs >= self.config.max_runs:
                self._fail(record, "inference", 1, f"gave up after {record.runs} interrupted run(s)")
                return
            record.state = StudyState.RUNNING
            record.runs += 1
            self.spool.write(record)
            generation = self._generation.get(key, 0)
        logger.info("study %s: running (run %d, %d instance(s))", key, record.runs, self.spool.instance_count(key))
        config = InferConfig(input=self.spool.dicom_dir(key), bundle=self.config.bundle,
                             out=self.spool.result_dir(key), device=self.config.device,
                             seg_format=self.config.seg_format, threads=self.config.threads, overwrite=True)
        start = time.perf_counter()
        failure: tuple[int, str] | None = None
        tumors: int | None = None
        try:
            tumors = run_inference(config).tumor_count
        except D4MError as exc:
            failure = (exc.exit_code, str(exc))
        except (MemoryError, RuntimeError, ValueError) as exc:  # one broken study must not end the service
            logger.error("study %s: unexpected %s", key, type(exc).__name__, exc_info=exc)
            failure = (1, f"unexpected {type(exc).__name__}: {exc}")
        seconds = round(time.perf_counter() - start, 2)
        with self._lock:
            if key in self._abandoned:
                return
            if self._generation.get(key, 0) != generation:
                logger.info("study %s: new instances arrived during the run: waiting for quiet again", key)
                self._reset(record)
                self.spool.write(record)
                return
            if failure is not None:
                self._fail(record, "inference", *failure)
                return
            record.state = StudyState.DONE
            record.tumor_count, record.seconds = tumors, seconds
            record.seg_uid = _sop_uid(self.spool.result_dir(key) / SEG_FILE)
            record.targets, record.sent, record.delivery_attempts = self.config.targets, {}, 0
            self.spool.write(record)
            self._delivering.add(key)
        logger.info("study %s: segmented in %.1f s (%s tumor(s))", key, seconds, tumors)
        try:
            self._deliver(key)
        finally:
            with self._lock:
                self._delivering.discard(key)

    def _fail(self, record: StudyRecord, stage: str, exit_code: int, message: str) -> None:
        """Mark failed (caller holds the lock or runs before the threads start)."""
        record.state = StudyState.FAILED
        record.stage, record.exit_code, record.error = stage, exit_code, record.scrub(message)
        self.spool.write(record)
        logger.error("study %s: %s failed (exit %d): %s", record.key, stage, exit_code, record.error)

    def _deliver(self, key: str) -> None:
        with self._lock:
            record = self._records[key]
            if not (record.state is StudyState.DONE or (record.state is StudyState.FAILED
                                                        and record.stage == "delivery")):
                return  # a new round started meanwhile: its own result will be delivered
            todo = [t for t in self.config.targets if t not in record.sent]
            record.targets = self.config.targets
            generation = self._generation.get(key, 0)
        seg = self.spool.result_dir(key) / SEG_FILE
        for target in todo:
            try:
                if target == FOLDER and self.config.output is not None:
                    copy_result(self.spool.result_dir(key), self.config.output / key)
                elif target == STORE and self.config.destination is not None:
                    attempts = send_with_retries(seg, self.config.destination, self.config.retry, self._stop, key)
                    with self._lock:
                        record.delivery_attempts += attempts
            except StopRequested:
                logger.info("study %s: delivery postponed to the next start", key)
                return
            except DeliveryError as exc:
                with self._lock:
                    if self._generation.get(key, 0) == generation:
                        self._fail(record, "delivery", exc.exit_code, str(exc))
                return
            with self._lock:
                if self._generation.get(key, 0) != generation:
                    return
                record.sent[target] = time.time()
                record.state, record.stage, record.error, record.exit_code = StudyState.DONE, None, None, None
                self.spool.write(record)
            logger.info("study %s: delivered (%s)", key, target)


def _sop_uid(path: Path) -> str | None:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (OSError, InvalidDicomError, AttributeError):
        return None


def serve(config: ServeConfig, on_start: Callable[[Service], None] | None = None) -> dict[str, Any]:
    """Run the service until :meth:`Service.request_stop`; returns the spool's status at the end.

    Parameters
    ----------
    config
        The service options.
    on_start
        Called with the started service (the CLI installs its signal handlers there).

    Returns
    -------
    dict
        :meth:`~d4m.runtime.spool.Spool.status` when the service stopped.

    Raises
    ------
    InputError
        An unwritable spool or a port that cannot be bound.
    BundleError
        The bundle does not verify.
    """
    service = Service(config)
    service.start()
    try:
        if on_start is not None:
            on_start(service)
        service.wait()
    finally:
        service.stop()
    return service.spool.status()


__all__ = ["FOLDER", "STORE", "ServeConfig", "Service", "serve"]
