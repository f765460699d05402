"""``d4m-train all``: the eight training stages in a row, resumable stage by stage.

One run folder holds every stage::

    RUN/pipeline.json          the run: preset, stages, their configs and keys, status, timings
                               (wall ``seconds`` and the process's ``cpu_seconds``)
    RUN/01-register/           registered dataset (every phase on the PVP grid)
    RUN/02-inpainter/          FFC inpainter run (trained without the validation and test cases)
    RUN/03-normalize/          registered images + tumour-free ("normal") images
    RUN/train-cases/           dataset view: the segmenter's training cases of 03-normalize
    RUN/04-autoencoder/        autoencoder run (training cases only)
    RUN/05-ldm/                latent diffusion run (training cases only)
    RUN/06-synthesize/         offline synthetic dataset: tumours painted by the autoencoder + LDM
                               into the training cases' normal CTs (the preset's copies per case)
    RUN/07-segmenter/          segmenter run: real + synthetic patches (the preset's ratio)
    RUN/08-evaluate/           results.md / .csv / .json on the test split

Each stage gets a *key*: the SHA-256 of its config (without ``device``, ``overwrite``) and of
the keys of the stages before it. ``pipeline.json`` records the key and status of each stage
(written atomically before a stage starts and after it ends). On a new call, a stage is

* skipped when it is recorded ``done`` with the same key and its output file exists;
* resumed when it is recorded with the same key but not done (a killed run): the stage
  functions resume their own work (per-case skips, ``resume.pt``);
* refused with an :class:`~d4m.dicom_io.errors.InputError` naming the changed fields when its
  key changed, unless ``overwrite``: then its folder is deleted and it is redone (and so are the
  stages after it, whose keys change with it).

The splits: the segmenter's train / validation / test split (its preset's fractions, ``seed``)
is computed once from the input dataset; the inpainter holds out the validation and test cases,
the autoencoder, the LDM and the synthesis see only the training cases, so the evaluation's test
cases were seen by no stage. Synthesis is offline (once, before the segmenter): on a CPU, latent
diffusion inside the training loop would take about half of each step (docs/results.md); the
online route stays available as ``d4m-train segmenter --synthesizer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import read_json, write_json
from d4m.training.config import StageConfig

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
PIPELINE_SCHEMA_VERSION = 1

#: Config fields that do not change a stage's result (left out of its key).
VOLATILE_FIELDS = frozenset({"device", "overwrite"})

#: A progress factory: ``(description, total)`` → context manager yielding ``advance(n)``.
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]

#: Per pipeline preset: the preset of each stage and the segmenter's synthetic ratio.
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # 2 cores, minutes: the plumbing of every stage, a segmenter that still finds the tumours
    "tiny": {"inpainter": "tiny", "autoencoder": "tiny", "ldm": "tiny", "synthesis": "tiny", "segmenter": "tiny",
             "synthetic_ratio": 0.25},
    # a CPU workstation: hours for the generative stages, a day for the segmenter
    "cpu": {"inpainter": "cpu", "autoencoder": "cpu", "ldm": "cpu", "synthesis": "cpu", "segmenter": "cpu",
            "synthetic_ratio": 0.5},
    # the paper's sizes, for a GPU
    "paper": {"inpainter": "paper", "autoencoder": "paper", "ldm": "paper", "synthesis": "paper",
              "segmenter": "paper", "synthetic_ratio": 0.5},
}


@dataclasses.dataclass(frozen=True)
class PipelineConfig(StageConfig):
    """Configuration of ``d4m-train all``.

    Attributes
    ----------
    data
        Input dataset (``dataset.json`` folder, e.g. ``d4m-train phantom``), not registered.
    out
        Run folder (one sub-folder per stage, ``pipeline.json``).
    preset
        ``tiny``, ``cpu`` or ``paper`` (:data:`PIPELINE_PRESETS`).
    synthetic_ratio
        Share of the segmenter's patches synthesized online; ``None`` = the preset's.
    seed
        Seed of every stage and of the split.
    device
        ``auto``, ``cpu`` or ``cuda`` (not part of the stage keys).
    overwrite
        Redo stages whose configuration changed (and those after them) instead of refusing.
    """

    stage: ClassVar[str] = "pipeline"

    data: Path = Path("data")
    out: Path = Path("runs/all")
    preset: str = "tiny"
    synthetic_ratio: float | None = None
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.preset not in PIPELINE_PRESETS:
            raise InputError(f"pipeline preset: expected one of {sorted(PIPELINE_PRESETS)}, found '{self.preset}'")
        if self.synthetic_ratio is not None and not 0.0 <= self.synthetic_ratio <= 1.0:
            raise InputError(f"synthetic ratio: expected a value in [0, 1], found {self.synthetic_ratio}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device: expected auto, cpu or cuda, found '{self.device}'")

    @property
    def presets(self) -> dict[str, Any]:
        """The stage presets and synthetic ratio this run uses."""
        values = dict(PIPELINE_PRESETS[self.preset])
        if self.synthetic_ratio is not None:
            values["synthetic_ratio"] = self.synthetic_ratio
        return values


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes
    ----------
    name
        Stage name (``register``, ...).
    output
        File inside the stage folder whose presence marks a finished stage.
    build
        ``(pipeline config, folders by stage name)`` → the stage config.
    run
        ``(stage config, progress)`` → anything; does the work (and resumes it).
    total
        Progress units of a stage config (cases, steps).
    prepare
        Called with ``(pipeline config, folders)`` right before ``run`` (writes helper files).
    resume_file
        For training stages: the file their resumption needs; without it a half-written
        folder is cleared before the stage restarts.
    """

    name: str
    output: str
    build: Callable[[PipelineConfig, dict[str, Path]], StageConfig]
    run: Callable[[Any, Callable[[int], None] | None], object]
    total: Callable[[Any], int]
    prepare: Callable[[PipelineConfig, dict[str, Path]], None] | None = None
    resume_file: str | None = None


def stage_folders(out: Path, stages: Sequence[Stage]) -> dict[str, Path]:
    """``RUN/<nn>-<name>`` for each stage, plus the ``train-cases`` view."""
    folders = {stage.name: out / f"{number:02d}-{stage.name}" for number, stage in enumerate(stages, start=1)}
    folders["train-cases"] = out / "train-cases"
    return folders


def stage_key(config: StageConfig, upstream: Sequence[str]) -> str:
    """SHA-256 of a stage config (volatile fields left out) and of the keys before it."""
    fields = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_FIELDS}
    text = json.dumps({"config": fields, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def changed_fields(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the config fields (volatile ones left out) that differ."""
    names = (set(previous) | set(current)) - VOLATILE_FIELDS
    return sorted(k for k in names if previous.get(k) != current.get(k))


# --------------------------------------------------------------------------------------------
# the run record
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_record(out: Path) -> dict[str, Any]:
    """``RUN/pipeline.json`` (an empty record when the run is new).

    Raises
    ------
    InputError
        The file is not a d4m pipeline record of this schema.
    """
    path = out / PIPELINE_FILE
    if not path.exists():
        return {}
    record = read_json(path)
    if not isinstance(record, dict) or record.get("kind") != "d4m-pipeline":
        raise InputError(f"{path}: expected a d4m pipeline record (kind 'd4m-pipeline'), found another file")
    if record.get("schema_version") != PIPELINE_SCHEMA_VERSION:
        raise InputError(f"{path}: expected schema_version {PIPELINE_SCHEMA_VERSION}, "
                         f"found {record.get('schema_version')}")
    return record


class _Record:
    """The run record kept in memory and written atomically after every change."""

    def __init__(self, config: PipelineConfig, previous: dict[str, Any]) -> None:
        self.path = config.out / PIPELINE_FILE
        self.previous = {s["name"]: s for s in previous.get("stages", [])}
        self.data: dict[str, Any] = {
            "schema_version": PIPELINE_SCHEMA_VERSION, "kind": "d4m-pipeline", "config": config.to_dict(),
            "presets": config.presets, "status": "running", "started": _now(), "finished": None,
            "seconds": None, "stages": [],
        }

    def stage(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.data["stages"] = [s for s in self.data["stages"] if s["name"] != entry["name"]] + [entry]
        self.save()
        return entry

    def save(self) -> None:
        """Write the record; stages not reached in this call keep their previous entries."""
        reached = {s["name"] for s in self.data["stages"]}
        kept = [s for name, s in self.previous.items() if name not in reached]
        write_json(self.path, {**self.data, "stages": self.data["stages"] + kept})


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig, stages: Sequence[Stage] | None = None,
                 progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of a pipeline into ``config.out``.

    Parameters
    ----------
    config
        The run.
    stages
        The stages (default: :func:`default_stages`, register → evaluate).
    progress
        Optional progress-bar factory, called once per stage that runs.

    Returns
    -------
    dict
        The final content of ``pipeline.json``.

    Raises
    ------
    InputError
        A stage's configuration changed since it was recorded (without ``overwrite``), a stage
        folder not recorded in ``pipeline.json``, or an error of a stage.
    """
    stages = list(stages if stages is not None else default_stages())
    config.out.mkdir(parents=True, exist_ok=True)
    folders = stage_folders(config.out, stages)
    record = _Record(config, read_record(config.out))
    clock = time.perf_counter()
    keys: list[str] = []
    try:
        for stage in stages:
            keys.append(_run_stage(stage, config, folders, keys, record, progress))
    except BaseException:
        record.data.update(status="failed", finished=_now(), seconds=round(time.perf_counter() - clock, 3))
        record.save()
        raise
    record.data.update(status="done", finished=_now(), seconds=round(time.perf_counter() - clock, 3))
    record.save()
    return record.data


def _run_stage(stage: Stage, config: PipelineConfig, folders: dict[str, Path], upstream: list[str],
               record: _Record, progress: ProgressFactory | None) -> str:
    folder = folders[stage.name]
    stage_config = stage.build(config, folders)
    key = stage_key(stage_config, upstream)
    entry = {"name": stage.name, "folder": folder.name, "key": key, "config": stage_config.to_dict(),
             "status": "pending", "seconds": None, "cpu_seconds": None, "started": None, "finished": None}
    previous = record.previous.get(stage.name)
    if previous is not None and previous.get("key") == key and previous.get("status") == "done" and (
            folder / stage.output).exists():
        logger.info("%s: done before with the same configuration, skipped", stage.name)
        record.stage({**previous, "status": "done", "skipped": True})
        return key
    _clear_or_refuse(stage, folder, previous, entry, config.overwrite)
    if stage.prepare is not None:
        stage.prepare(config, folders)
    entry.update(status="running", started=_now())
    record.stage(entry)
    logger.info("%s: running into %s", stage.name, folder)
    clock, cpu = time.perf_counter(), time.process_time()
    with _progress(progress, stage, stage_config) as advance:
        stage.run(stage_config, advance)
    entry.update(status="done", finished=_now(), seconds=round(time.perf_counter() - clock, 3),
                 cpu_seconds=round(time.process_time() - cpu, 3))
    record.stage(entry)
    return key


def _clear_or_refuse(stage: Stage, folder: Path, previous: dict[str, Any] | None, entry: dict[str, Any],
                     overwrite: bool) -> None:
    """Make ``folder`` ready: keep a resumable one, delete a changed one (``overwrite``) or refuse."""
    if not folder.exists():
        return
    if previous is None:
        if not overwrite:
            raise InputError(f"{folder}: expected a stage folder recorded in {PIPELINE_FILE}, found an unrecorded "
                             "one (use --overwrite to redo it)")
        _remove(folder)
        return
    if previous.get("key") != entry["key"]:
        changed = changed_fields(previous.get("config", {}), entry["config"]) or ["an earlier stage"]
        if not overwrite:
            raise InputError(f"{folder}: expected the configuration recorded in {PIPELINE_FILE}, found changes in "
                             f"{changed} (use --overwrite to redo this stage and the ones after it)")
        logger.info("%s: configuration changed (%s), redone", stage.name, ", ".join(changed))
        _remove(folder)
        return
    unresumable = stage.resume_file is not None and not (folder / stage.resume_file).exists()
    if previous.get("status") == "done" or unresumable:
        # a finished stage whose output went missing, or a training stage killed before its first checkpoint
        logger.info("%s: nothing to resume in %s, started again", stage.name, folder)
        _remove(folder)
    else:
        logger.info("%s: resuming the interrupted stage in %s", stage.name, folder)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextlib.contextmanager
def _progress(factory: ProgressFactory | None, stage: Stage, config: StageConfig) -> Iterator[
        Callable[[int], None] | None]:
    if factory is None:
        yield None
        return
    with factory(stage.name, stage.total(config)) as advance:
        yield advance


# --------------------------------------------------------------------------------------------
# the seven stages
# --------------------------------------------------------------------------------------------


def pipeline_split(config: PipelineConfig) -> dict[str, list[str]]:
    """The case ids of the segmenter's train / val / test split of the input dataset."""
    from d4m.training.datasets import load_dataset
    from d4m.training.segmenter import segmenter_preset
    from d4m.training.segmenter_data import split_cases

    fractions = segmenter_preset(config.presets["segmenter"]).split
    parts = split_cases(load_dataset(config.data), fractions, config.seed)
    return {name: sorted(c.id for c in cases) for name, cases in parts.items()}


def _cases(config: StageConfig) -> int:
    from d4m.training.datasets import load_dataset

    return len(load_dataset(config.data))  # type: ignore[attr-defined]


def _steps(config: StageConfig) -> int:
    return int(config.steps)  # type: ignore[attr-defined]


def _build_register(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.prealignment import RegistrationConfig

    return RegistrationConfig(data=config.data, out=folders["register"], seed=config.seed)


def _run_register(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.prealignment import register_dataset

    return register_dataset(config, progress=progress)


def _build_inpainter(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.inpainter import InpainterConfig

    split = pipeline_split(config)
    return InpainterConfig.from_preset(config.presets["inpainter"], data=folders["register"], out=folders["inpainter"],
                                       holdout=tuple(split["val"] + split["test"]), seed=config.seed,
                                       device=config.device)


def _run_inpainter(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.inpainter_training import train_inpainter

    return train_inpainter(config, progress=progress)


def _build_normalize(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.normal_ct import NormalizeConfig

    return NormalizeConfig(data=folders["register"], out=folders["normalize"], inpainter="ffc",  # type: ignore[arg-type]
                           model=folders["inpainter"])


def _run_normalize(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.normal_ct import normalize_dataset

    return normalize_dataset(config, progress=progress)


def write_train_view(config: PipelineConfig, folders: dict[str, Path]) -> Path:
    """Write ``RUN/train-cases/dataset.json``: the training cases of the normalized dataset."""
    from d4m.training.datasets import Dataset, load_dataset

    normalized = load_dataset(folders["normalize"])
    train = set(pipeline_split(config)["train"])
    view = Dataset(folders["train-cases"], tuple(c for c in normalized.cases if c.id in train), normalized.phases,
                   {"stage": "train-cases", "from": str(folders["normalize"]), "cases": sorted(train)})
    return view.save()


def _prepare_train_view(config: PipelineConfig, folders: dict[str, Path]) -> None:
    write_train_view(config, folders)


def _build_autoencoder(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.autoencoder import AutoencoderConfig

    return AutoencoderConfig.from_preset(config.presets["autoencoder"], data=folders["train-cases"],
                                         out=folders["autoencoder"], seed=config.seed, device=config.device)


def _run_autoencoder(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.autoencoder import train_autoencoder

    return train_autoencoder(config, progress=progress)


def _build_ldm(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.ldm import LDMConfig

    return LDMConfig.from_preset(config.presets["ldm"], data=folders["train-cases"], autoencoder=folders["autoencoder"],
                                 out=folders["ldm"], seed=config.seed, device=config.device)


def _run_ldm(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.ldm import train_ldm

    return train_ldm(config, progress=progress)


def _build_synthesize(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.synthesis import SynthesisConfig

    return SynthesisConfig.from_preset(config.presets["synthesis"], data=folders["train-cases"],
                                       out=folders["synthesize"], synthesizer="ldm",
                                       autoencoder=folders["autoencoder"], ldm=folders["ldm"], seed=config.seed,
                                       device=config.device)


def _run_synthesize(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.synthesis import synthesize_dataset

    return synthesize_dataset(config, progress=progress)


def _synthetic_cases(config: Any) -> int:
    return _cases(config) * int(config.copies)


def _build_segmenter(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.segmenter import segmenter_preset

    ratio = float(config.presets["synthetic_ratio"])
    return segmenter_preset(config.presets["segmenter"], data=folders["normalize"], out=folders["segmenter"],
                            synthetic_ratio=ratio, synthetic_data=folders["synthesize"] if ratio > 0 else None,
                            seed=config.seed, device=config.device)


def _run_segmenter(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.segmenter_training import train_segmenter

    return train_segmenter(config, progress=progress)


def _build_evaluate(config: PipelineConfig, folders: dict[str, Path]) -> StageConfig:
    from d4m.training.evaluation import EvaluationConfig

    return EvaluationConfig(model=folders["segmenter"], out=folders["evaluate"], split="test", device=config.device)


def _run_evaluate(config: Any, progress: Callable[[int], None] | None) -> object:
    from d4m.training.evaluation import evaluate

    return evaluate(config, progress=progress)


def _evaluate_total(config: Any) -> int:
    from d4m.training.datasets import load_dataset
    from d4m.training.segmenter import SegmenterConfig
    from d4m.training.segmenter_data import split_cases

    model = SegmenterConfig.load(config.model / "config.json")
    return len(split_cases(load_dataset(model.data), model.split, model.seed)["test"])


def default_stages() -> list[Stage]:
    """register → inpainter → normalize → autoencoder → ldm → synthesize → segmenter → evaluate."""
    return [
        Stage("register", "dataset.json", _build_register, _run_register, _cases),
        Stage("inpainter", "model.safetensors", _build_inpainter, _run_inpainter, _steps, resume_file="resume.pt"),
        Stage("normalize", "dataset.json", _build_normalize, _run_normalize, _cases),
        Stage("autoencoder", "model.safetensors", _build_autoencoder, _run_autoencoder, _steps,
              prepare=_prepare_train_view, resume_file="resume.pt"),
        Stage("ldm", "model.safetensors", _build_ldm, _run_ldm, _steps, resume_file="resume.pt"),
        Stage("synthesize", "dataset.json", _build_synthesize, _run_synthesize, _synthetic_cases,
              prepare=_prepare_train_view),
        Stage("segmenter", "model.safetensors", _build_segmenter, _run_segmenter, _steps, resume_file="resume.pt"),
        Stage("evaluate", "results.json", _build_evaluate, _run_evaluate, _evaluate_total),
    ]
