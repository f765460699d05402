"""The Diff4MMLiTS paper's experiments (Tables I, III, IV, V, the LiTS external test) on the phantom.

A resumable job queue over the ``d4m-train`` CLIs (one job at a time, or ``--jobs N``). Every
segmenter run and every evaluation writes into its own folder under ``--root``; a job whose output
is complete is skipped, so the script can be killed and started again. Jobs whose inputs are not
there yet (the LDM of another session, the median-normalised dataset) wait while the next runnable
job in priority order runs. After ``--train-until`` (UTC ``HH:MM`` or ``+minutes``) no new
training starts; evaluations of finished runs still do. ``--plan small`` is the 2-core CPU plan;
``--plan full`` is three seeds of every row, meant for a GPU machine with ``--device cuda --jobs 14
--make-inputs`` (which also builds the cohort, registration, median NCG, autoencoder and LDM);
the full plan was not run yet.

Run::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice .venv/bin/python bench/paper_experiments.py run
    .venv/bin/python bench/paper_experiments.py run --dry-run     # the exact commands, in order
    .venv/bin/python bench/paper_experiments.py tables            # Markdown tables from what finished

Inputs (read only): ``--data`` the registered phantom cohort (``d4m-train phantom`` + ``register``);
``--mcs`` the autoencoder and per-phase LDM runs (``autoencoder``, ``ldm-per-phase`` and their
``.done`` flags); ``--median`` a ``d4m-train normalize --inpainter median`` dataset of the same
cohort. The cohort's ``normal`` images are the phantom's true tumour-free renders, registered with
the phases: hybrid runs on ``--data`` therefore use an *ideal* Normal CT Generator (called
``oracle`` below); runs on ``--median`` use the median-filter NCG (the paper's Table V ``$`` row).

Some steps have no CLI option and use the Python API (printed as ``# python-api:`` in a dry run):
the synthesis config JSON that ``d4m-train segmenter --synthesizer`` reads, a PVP-only view of
the cohort (unimodal training: the missing phases are filled by duplicating PVP, the inference
rule), the PVP-only evaluation (``EvaluationConfig.phase_sets``), and the OOD cohort (phantom
settings and CT noise that ``d4m-train phantom`` does not expose).

Seeds: a run's seed fixes its train/val/test split (``split_cases``), the patches, the
augmentation and the initial weights; runs that share a seed share the split (paired
comparisons), and the spread over seeds covers both the split and the training randomness.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ALL_PHASES = "NC+ART+PVP+DEL"
TRAIN = Path(sys.executable).parent / "d4m-train"


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the inputs are, where everything is written, and how commands are run."""

    root: Path
    data: Path
    mcs: Path
    median: Path
    train: tuple[str, ...] = (str(TRAIN),)
    device: str = "cpu"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def synth(self) -> Path:
        return self.root / "synth"

    @property
    def pvp_view(self) -> Path:
        return self.root / "data" / "pvp-only"

    @property
    def ood_cohort(self) -> Path:
        return self.root / "ood" / "cohort"

    @property
    def ood(self) -> Path:
        return self.root / "ood" / "registered"

    @property
    def autoencoder(self) -> Path:
        return self.mcs / "autoencoder"

    @property
    def ldm(self) -> Path:
        return self.mcs / "ldm-per-phase"

    def d4m(self, *args: str) -> list[str]:
        """A ``d4m-train -q ...`` command line."""
        return [*self.train, "-q", *args]


@dataclasses.dataclass(frozen=True)
class Run:
    """One segmenter training run (tiny preset)."""

    name: str
    data: str = "real"  # real | median | pvp
    backbone: str = "dynunet"
    seed: int = 0
    synthesizer: str | None = None  # None | ldm | rules
    ratio: float = 0.5
    fraction: float = 1.0
    dropout: float = 0.0


@dataclasses.dataclass
class Job:
    """A step of the queue: one command, with its readiness and completion tests."""

    name: str
    training: bool
    command: list[str]
    done: Callable[[], bool]
    ready: Callable[[], bool]
    describe: str = ""


# ----------------------------------------------------------------------------------- the plan

SEEDS = (0, 1, 2)


def planned_runs(plan: str) -> list[Run]:
    """Every training run, in priority order (the queue takes the first runnable one).

    ``small``: the CPU plan (2 shared cores); ``full``: three seeds of everything (a GPU machine).
    """
    if plan == "full":
        return _full_plan()
    runs: list[Run] = []
    for seed in SEEDS:  # (a) Table I analog: real-only vs hybrid (LDM when there, else the rules synthesizer)
        runs.append(Run(f"dynunet-real-s{seed}", seed=seed))
        runs.append(Run(f"dynunet-ldm-s{seed}", seed=seed, synthesizer="ldm"))
        runs.append(Run(f"dynunet-rules-s{seed}", seed=seed, synthesizer="rules"))
    runs.append(Run("dynunet-pvp-real-s0", data="pvp"))  # (b) Table IV: unimodal, 100 %
    runs.append(Run("dynunet-ldm-f30-s0", synthesizer="ldm", fraction=0.3))  # (b) multimodal hybrid, 30 %
    runs.append(Run("dynunet-median-ldm-s0", data="median", synthesizer="ldm"))  # (c) Table V: median NCG
    for backbone in ("unet", "segresnet"):  # (a) Table III analog, one seed
        runs.append(Run(f"{backbone}-real-s0", backbone=backbone))
        runs.append(Run(f"{backbone}-ldm-s0", backbone=backbone, synthesizer="ldm"))
    runs.append(Run("dynunet-real-drop30-s0", dropout=0.3))  # (e) phase dropout
    return runs


def _full_plan() -> list[Run]:
    runs: list[Run] = []

    def each_seed(name: str, **fields: Any) -> None:
        runs.extend(Run(f"{name}-s{seed}", seed=seed, **fields) for seed in SEEDS)

    each_seed("dynunet-real")
    each_seed("dynunet-ldm", synthesizer="ldm")
    each_seed("dynunet-rules", synthesizer="rules")
    each_seed("dynunet-pvp-real", data="pvp")
    each_seed("dynunet-real-drop30", dropout=0.3)
    for backbone in ("unet", "segresnet"):
        each_seed(f"{backbone}-real", backbone=backbone)
        each_seed(f"{backbone}-ldm", backbone=backbone, synthesizer="ldm")
    each_seed("dynunet-ldm-f10", synthesizer="ldm", fraction=0.1)
    each_seed("dynunet-ldm-f30", synthesizer="ldm", fraction=0.3)
    each_seed("dynunet-median-ldm", data="median", synthesizer="ldm")
    each_seed("dynunet-ldm-f50", synthesizer="ldm", fraction=0.5)
    each_seed("dynunet-ldm-f70", synthesizer="ldm", fraction=0.7)
    each_seed("dynunet-real-f10", fraction=0.1)
    each_seed("dynunet-real-f30", fraction=0.3)
    each_seed("attention-unet-real", backbone="attention-unet")
    each_seed("attention-unet-ldm", backbone="attention-unet", synthesizer="ldm")
    return runs


def train_command(run: Run, paths: Paths) -> list[str]:
    """The ``d4m-train segmenter`` command of a run."""
    data = {"real": paths.data, "median": paths.median, "pvp": paths.pvp_view}[run.data]
    command = paths.d4m("segmenter", "--data", str(data), "--out", str(paths.runs / run.name), "--preset", "tiny",
                        "--backbone", run.backbone, "--seed", str(run.seed), "--device", paths.device)
    if run.synthesizer:
        command += ["--synthetic-ratio", str(run.ratio), "--synthesizer", str(paths.synth / f"{run.synthesizer}.json")]
    if run.fraction < 1.0:
        command += ["--data-fraction", str(run.fraction)]
    if run.dropout > 0:
        command += ["--phase-dropout", str(run.dropout)]
    return command


def evaluate_command(run: Run, paths: Paths, kind: str) -> list[str]:
    """``d4m-train evaluate`` of a run: ``test`` (held-out split), ``subsets`` (15 phase sets), ``ood``."""
    out = paths.evals / run.name / kind
    command = paths.d4m("evaluate", "--model", str(paths.runs / run.name), "--out", str(out), "--device", paths.device)
    if kind == "ood":
        return command + ["--data", str(paths.ood), "--split", "all"]
    command += ["--data", str(paths.data), "--split", "test"]
    return command + (["--every-subset"] if kind == "subsets" else [])


# ------------------------------------------------------------------------------ preparations
# Steps without a CLI option; each runs in a child process (``paper_experiments.py action NAME``).

def write_synthesis_config(paths: Paths, which: str) -> None:
    """The synthesis config JSON read by ``segmenter --synthesizer`` (no CLI writes one on its own)."""
    from d4m.training.synthesis import SynthesisConfig

    paths.synth.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"synthesizer": which, "device": paths.device}
    if which == "ldm":
        extra.update(autoencoder=paths.autoencoder, ldm=paths.ldm)
    config = SynthesisConfig.from_preset("tiny", data=paths.data, out=paths.synth / f"unused-{which}", **extra)
    config.save(paths.synth / f"{which}.json")


def write_pvp_view(paths: Paths) -> None:
    """A dataset listing only the PVP image of each case (absolute paths into ``paths.data``)."""
    from d4m.dicom_io.codes import Phase
    from d4m.training.datasets import Dataset, load_dataset

    source = load_dataset(paths.data)
    cases = tuple(dataclasses.replace(
        case, images={Phase.PVP: case.images[Phase.PVP]},
        normal={Phase.PVP: case.normal[Phase.PVP]} if Phase.PVP in case.normal else {},
        truth={Phase.PVP: case.truth[Phase.PVP]} if Phase.PVP in case.truth else {},
    ) for case in source.cases)
    paths.pvp_view.mkdir(parents=True, exist_ok=True)
    Dataset(paths.pvp_view, cases, source.phases, {"view": "PVP only", "from": str(paths.data)}).save()


#: The OOD cohort: the LiTS external-test analog. Another seed, 1.6× the CT noise, smaller and more numerous
#: tumours (5-30 mm, up to 8), no cysts, no tumour-free case; the same ``small`` grid (a ``medium`` grid,
#: 1.4 × 1.4 × 3 mm, costs ~7× the voxels to generate and register: too much for the shared CPU).
OOD_OPTIONS = ("--cases", "8", "--seed", "1001", "--size", "small", "--tumor-free-fraction", "0", "--max-tumors", "8",
               "--min-tumor-mm", "5", "--max-tumor-mm", "30", "--tumor-kind", "hcc", "--tumor-kind", "metastasis",
               "--noise-scale", "1.6", "--no-dicom")


def evaluate_pvp_only(paths: Paths, name: str, kind: str) -> None:
    """Evaluate a run with only the PVP phase given (duplicated into the four channels).

    ``kind``: ``test`` (its test split) or ``ood-pvp`` (the whole OOD cohort; LiTS is PVP only).
    """
    from d4m.dicom_io.codes import Phase
    from d4m.training.evaluation import EvaluationConfig, evaluate

    data, split = (paths.data, "test") if kind == "test" else (paths.ood, "all")
    evaluate(EvaluationConfig(model=paths.runs / name, out=paths.evals / name / kind, data=data,
                              split=split, phase_sets=((Phase.PVP,),), device=paths.device))


def run_action(paths: Paths, name: str) -> None:
    """Run one Python-API step by name (called in a child process by the queue)."""
    if name in ("synth-rules", "synth-ldm"):
        write_synthesis_config(paths, name.removeprefix("synth-"))
    elif name == "pvp-view":
        write_pvp_view(paths)
    elif name.endswith(("/test", "/ood-pvp")):
        run, kind = name.rsplit("/", 1)
        evaluate_pvp_only(paths, run, kind)
    else:
        raise ValueError(f"unknown action {name!r}")


# ------------------------------------------------------------------------------------- queue

def _training_done(folder: Path) -> bool:
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return int(metrics.get("step", -1)) >= int(config["steps"]) and (folder / "model.safetensors").exists()


def _exists(*files: Path) -> Callable[[], bool]:
    return lambda: all(f.exists() for f in files)


def _trained(folder: Path) -> Callable[[], bool]:
    return lambda: _training_done(folder)


def _all(*tests: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(t() for t in tests)


def _done_flag(folder: Path) -> Path:
    return Path(str(folder) + ".done")


def _flagged(command: list[str], flag: Path) -> list[str]:
    """``command && touch flag`` (the shared-input convention of the other stages)."""
    return ["bash", "-c", f"{shlex.join(command)} && touch {shlex.quote(str(flag))}"]


def input_jobs(paths: Paths) -> list[Job]:
    """Make the shared inputs here (a fresh machine): cohort, registration, median NCG, autoencoder + LDM."""
    cohort = paths.data.parent / "cohort"
    data_ready = _exists(_done_flag(paths.data))
    ae_flag, ldm_flag = paths.mcs / "autoencoder.done", paths.mcs / "ldm-per-phase.done"
    return [
        Job("cohort", False, paths.d4m("phantom", "--out", str(cohort), "--cases", "20", "--seed", "0",
                                       "--size", "small", "--no-dicom"),
            _exists(cohort / "dataset.json"), lambda: True),
        Job("register", False, _flagged(paths.d4m("register", "--data", str(cohort), "--out", str(paths.data)),
                                        _done_flag(paths.data)),
            data_ready, _exists(cohort / "dataset.json")),
        Job("autoencoder", False, _flagged(paths.d4m("autoencoder", "--data", str(paths.data), "--out",
                                                     str(paths.autoencoder), "--preset", "cpu", "--device",
                                                     paths.device), ae_flag),
            _exists(ae_flag), data_ready),
        Job("ldm", False, _flagged(paths.d4m("ldm", "--data", str(paths.data), "--autoencoder", str(paths.autoencoder),
                                             "--out", str(paths.ldm), "--mode", "per-phase", "--preset", "cpu",
                                             "--device", paths.device), ldm_flag),
            _exists(ldm_flag), _exists(ae_flag)),
        Job("median", False, _flagged(paths.d4m("normalize", "--data", str(paths.data), "--out", str(paths.median),
                                                "--inpainter", "median"), _done_flag(paths.median)),
            _exists(_done_flag(paths.median)), data_ready),
    ]


def build_jobs(paths: Paths, plan: str, make_inputs: bool = False) -> list[Job]:
    """The whole queue, in priority order."""
    options = ["--root", str(paths.root), "--data", str(paths.data), "--mcs", str(paths.mcs), "--median",
               str(paths.median), "--device", paths.device]

    def me(step: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "action", step, *options]

    data_ready = _exists(_done_flag(paths.data))
    ldm_ready = _exists(paths.mcs / "autoencoder.done", paths.mcs / "ldm-per-phase.done")
    jobs = input_jobs(paths) if make_inputs else []
    jobs += [
        Job("synth-rules", False, me("synth-rules"), _exists(paths.synth / "rules.json"), lambda: True,
            "# python-api: SynthesisConfig.from_preset('tiny', synthesizer='rules').save(SYNTH/rules.json)"),
        Job("synth-ldm", False, me("synth-ldm"), _exists(paths.synth / "ldm.json"), ldm_ready,
            f"# python-api: SynthesisConfig.from_preset('tiny', synthesizer='ldm', autoencoder={paths.autoencoder}, "
            f"ldm={paths.ldm}).save(SYNTH/ldm.json)"),
        Job("pvp-view", False, me("pvp-view"), _exists(paths.pvp_view / "dataset.json"), data_ready,
            f"# python-api: a dataset.json listing only the PVP images of {paths.data}"),
    ]
    ood_ready = _exists(paths.ood / "dataset.json")
    ood_jobs = [
        Job("ood-cohort", False, paths.d4m("phantom", "--out", str(paths.ood_cohort), *OOD_OPTIONS),
            _exists(paths.ood_cohort / "dataset.json"), lambda: True),
        Job("ood-register", False, paths.d4m("register", "--data", str(paths.ood_cohort), "--out", str(paths.ood)),
            ood_ready, _exists(paths.ood_cohort / "dataset.json")),
    ]
    synth_ready = {"rules": _exists(paths.synth / "rules.json"), "ldm": _exists(paths.synth / "ldm.json")}
    median_ready = _exists(_done_flag(paths.median))
    trained: dict[str, Callable[[], bool]] = {}
    for run in planned_runs(plan):
        folder = paths.runs / run.name
        needs = [data_ready]
        needs += [synth_ready[run.synthesizer]] if run.synthesizer else []
        needs += [median_ready] if run.data == "median" else []
        needs += [_exists(paths.pvp_view / "dataset.json")] if run.data == "pvp" else []
        done = _trained(folder)
        trained[run.name] = done
        jobs.append(Job(run.name, True, train_command(run, paths), done, _all(*needs)))
        test = paths.evals / run.name / "test" / "results.json"
        if run.data == "pvp":
            jobs.append(Job(f"{run.name}/test", False, me(f"{run.name}/test"), _exists(test), done,
                            f"# python-api: evaluate(EvaluationConfig(model={folder}, out={test.parent}, "
                            f"data={paths.data}, split='test', phase_sets=(('PVP',),)))"))
        else:
            jobs.append(Job(f"{run.name}/test", False, evaluate_command(run, paths, "test"), _exists(test), done))
        if run.data != "pvp" and run.fraction == 1.0 and run.dropout == 0:  # (d) OOD, once it is registered
            ood = paths.evals / run.name / "ood" / "results.json"
            jobs.append(Job(f"{run.name}/ood", False, evaluate_command(run, paths, "ood"), _exists(ood),
                            _all(done, ood_ready)))
            ood_pvp = paths.evals / run.name / "ood-pvp" / "results.json"
            jobs.append(Job(f"{run.name}/ood-pvp", False, me(f"{run.name}/ood-pvp"), _exists(ood_pvp),
                            _all(done, ood_ready), f"# python-api: evaluate(EvaluationConfig(model={folder}, "
                            f"out={ood_pvp.parent}, data={paths.ood}, split='all', phase_sets=(('PVP',),)))"))
        if run.dropout > 0:  # (e) every missing-phase subset, with and without dropout
            base = run.name.replace("-drop30", "")
            for name in (base, run.name):
                subsets = paths.evals / name / "subsets" / "results.json"
                jobs.append(Job(f"{name}/subsets", False, evaluate_command(Run(name), paths, "subsets"),
                                _exists(subsets), _all(done, trained[base])))
        if run.name == "dynunet-rules-s0":
            jobs += ood_jobs
    return jobs


def _log(message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)  # noqa: T201 - a bench script reports on stdout


def _deadline(text: str | None) -> dt.datetime | None:
    """``HH:MM`` (UTC, today) or ``+M`` (minutes from now)."""
    if not text:
        return None
    now = dt.datetime.now(dt.UTC)
    if text.startswith("+"):
        return now + dt.timedelta(minutes=float(text[1:]))
    hours, minutes = (int(v) for v in text.split(":"))
    return now.replace(hour=hours, minute=minutes, second=0, microsecond=0)


@dataclasses.dataclass
class _Running:
    job: Job
    process: subprocess.Popen[bytes]
    clock: float


def _finish(item: _Running, code: int, paths: Paths, failed: set[str]) -> None:
    seconds = time.perf_counter() - item.clock
    ok = code == 0 and item.job.done()
    if ok:
        _log(f"done {item.job.name} in {seconds:.0f} s")
    else:
        failed.add(item.job.name)
        _log(f"FAILED {item.job.name} (exit {code}) after {seconds:.0f} s (see {paths.logs})")
    with (paths.root / "timings.jsonl").open("a") as handle:
        handle.write(json.dumps({"job": item.job.name, "seconds": round(seconds, 1), "ok": ok,
                                 "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}) + "\n")


def run_queue(jobs: Sequence[Job], paths: Paths, limits: tuple[dt.datetime | None, dt.datetime | None],
              workers: int = 1, dry_run: bool = False) -> None:
    """Run the jobs, up to ``workers`` at once: always the first pending job whose inputs exist.

    ``limits``: no training starts after the first time, no job after the second (running jobs
    are then stopped; a stopped training resumes from its last checkpoint on the next call).
    """
    if dry_run:
        for job in jobs:
            state = "done" if job.done() else ("ready" if job.ready() else "waits")
            print(f"# [{state}] {job.name}\n{job.describe or shlex.join(job.command)}")  # noqa: T201
        return
    train_until, stop_at = limits
    paths.logs.mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    running: list[_Running] = []
    while True:
        for item in list(running):
            code = item.process.poll()
            if code is not None:
                running.remove(item)
                _finish(item, code, paths, failed)
        now = dt.datetime.now(dt.UTC)
        if stop_at is not None and now >= stop_at:
            for item in running:
                item.process.terminate()
                _log(f"stopped {item.job.name}")
            _log("stop time reached")
            return
        busy = {item.job.name for item in running}
        pending = [j for j in jobs if j.name not in failed and j.name not in busy and not j.done()]
        if train_until is not None and now >= train_until:
            pending = [j for j in pending if not j.training]
        if not pending and not running:
            _log("nothing left to run")
            return
        job = next((j for j in pending if j.ready()), None) if len(running) < workers else None
        if job is None:
            time.sleep(30 if workers == 1 else 2)
            continue
        _log(f"start {job.name}")
        handle = (paths.logs / (job.name.replace("/", ".") + ".log")).open("a")
        handle.write(f"$ {shlex.join(job.command)}\n")
        handle.flush()
        process = subprocess.Popen(job.command, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        running.append(_Running(job, process, time.perf_counter()))


# ------------------------------------------------------------------------------------ tables

METRICS = (("tumor_dice", "DSC"), ("tumor_jaccard", "JAC"), ("tumor_sensitivity", "SE"),
           ("tumor_precision", "PRE"), ("tumor_dice_global", "DSC global"), ("lesion_f1", "lesion F1"),
           ("liver_dice", "liver DSC"))


def _summary(paths: Paths, run: str, kind: str, phases: str = ALL_PHASES) -> dict[str, float] | None:
    file = paths.evals / run / kind / "results.json"
    if not file.exists():
        return None
    summary = json.loads(file.read_text())["summary"]
    values = summary.get(phases)
    if values is None:
        return None
    return {k: (math.nan if v is None else float(v)) for k, v in values.items()}


def _cell(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _row(paths: Paths, label: str, runs: Sequence[str], kind: str = "test", phases: str = ALL_PHASES) -> str | None:
    found = [(r, s) for r in runs if (s := _summary(paths, r, kind, phases)) is not None]
    if not found:
        return None
    cells = [_cell([s[m] for _, s in found]) for m, _ in METRICS]
    seeds = ", ".join(r.rsplit("-s", 1)[-1] for r, _ in found)
    cases = int(sum(s["cases"] for _, s in found) / len(found))
    return f"| {label} | {' | '.join(cells)} | {len(found)} ({seeds}) | {cases} |"


def _table(paths: Paths, title: str, rows: Sequence[tuple[str, Sequence[str]]], kind: str = "test",
           phases: str = ALL_PHASES) -> list[str]:
    header = "| method | " + " | ".join(n for _, n in METRICS) + " | seeds | test cases |"
    lines = [f"### {title}", "", header, "|---" * (len(METRICS) + 3) + "|"]
    body = [r for label, runs in rows if (r := _row(paths, label, runs, kind, phases)) is not None]
    return lines + (body or ["| (no finished run) |" + " |" * (len(METRICS) + 2)]) + [""]


def _seeds(prefix: str) -> list[str]:
    return [f"{prefix}-s{s}" for s in SEEDS]


def tables(paths: Paths) -> str:
    """Markdown tables (per cent, mean ± sample SD over seeds) from every finished evaluation."""
    out = ["Tumour metrics in %, mean ± SD over the seeds listed (one seed: no SD); held-out test split "
           "of the 20-case phantom cohort (12 train / 4 val / 4 test per seed), all four phases given.", ""]
    rows = [("DynUNet (nnU-Net-like), real only", "dynunet-real"),
            ("DynUNet, hybrid (oracle NCG + LDM)", "dynunet-ldm"),
            ("DynUNet, hybrid (oracle NCG + rules)", "dynunet-rules"),
            ("U-Net, real only", "unet-real"), ("U-Net, hybrid (LDM)", "unet-ldm"),
            ("SegResNet, real only", "segresnet-real"), ("SegResNet, hybrid (LDM)", "segresnet-ldm"),
            ("AttentionUNet, real only", "attention-unet-real"), ("AttentionUNet, hybrid (LDM)", "attention-unet-ldm")]
    out += _table(paths, "Table I / III analog: real-only vs hybrid (real + synthesized), per backbone",
                  [(label, _seeds(prefix)) for label, prefix in rows])
    title = "Table IV analog: unimodal (PVP only) vs multimodal hybrid with a fraction of the real cases"
    out += _table(paths, title, [
        ("uni (PVP only), real, 100 % (12 cases)", _seeds("dynunet-pvp-real")),
        ("multi, real only, 10 % (2 cases)", _seeds("dynunet-real-f10")),
        ("multi, real only, 30 % (4 cases)", _seeds("dynunet-real-f30")),
        ("multi, real only, 100 % (12 cases)", _seeds("dynunet-real")),
        ("multi hybrid (LDM), 10 % (2 cases)", _seeds("dynunet-ldm-f10")),
        ("multi hybrid (LDM), 30 % (4 cases)", _seeds("dynunet-ldm-f30")),
        ("multi hybrid (LDM), 50 % (6 cases)", _seeds("dynunet-ldm-f50")),
        ("multi hybrid (LDM), 70 % (9 cases)", _seeds("dynunet-ldm-f70")),
        ("multi hybrid (LDM), 100 % (12 cases)", _seeds("dynunet-ldm")),
    ])
    out += ["The PVP-only model is evaluated with PVP alone (duplicated into the four channels), the "
            "multimodal ones with all four phases.", ""]
    out += _table(paths, "Table V analog: inpainter and synthesizer replaced (DynUNet)", [
        ("real only (no synthesis)", _seeds("dynunet-real")),
        ("median-filter NCG ($) + LDM", _seeds("dynunet-median-ldm")),
        ("oracle NCG + rules synthesizer (#)", _seeds("dynunet-rules")),
        ("oracle NCG + LDM (full pipeline, ideal NCG)", _seeds("dynunet-ldm")),
    ])
    out += _table(paths, "OOD analog (LiTS external test): trained on the cohort, tested on the OOD cohort",
                  [(label, _seeds(prefix)) for label, prefix in [*rows, ("DynUNet, hybrid median NCG (LDM)",
                                                                       "dynunet-median-ldm")]], kind="ood")
    out += _table(paths, "OOD analog, PVP only given (LiTS is single-phase): the same models, PVP duplicated",
                  [(label, _seeds(prefix)) for label, prefix in rows], kind="ood-pvp", phases="PVP")
    out += _paired_table(paths)
    out += _dropout_table(paths)
    return "\n".join(out)


def _case_scores(paths: Paths, run: str, kind: str, metric: str = "tumor_dice") -> dict[str, float]:
    file = paths.evals / run / kind / "results.json"
    if not file.exists():
        return {}
    rows = json.loads(file.read_text())["cases"]
    phases = "PVP" if kind == "ood-pvp" else ALL_PHASES
    return {r["case"]: float(r[metric]) for r in rows if r["phases"] == phases and r.get(metric) is not None}


def _paired_table(paths: Paths) -> list[str]:
    """Per-case paired tumour-DSC differences against the real-only run of the same seed and backbone."""
    lines = ["### Paired differences: tumour DSC (method − real only), same backbone, seed and test cases", "",
             "| method | test split: mean diff ± SE (n cases) | OOD cohort: mean diff ± SE (n cases) "
             "| OOD cohort, PVP only: mean diff ± SE (n cases) |",
             "|---|---|---|---|"]
    found = False
    for backbone in ("dynunet", "unet", "segresnet", "attention-unet"):
        for method in ("ldm", "rules", "median-ldm"):
            cells = []
            for kind in ("test", "ood", "ood-pvp"):
                diffs = []
                for seed in SEEDS:
                    base = _case_scores(paths, f"{backbone}-real-s{seed}", kind)
                    other = _case_scores(paths, f"{backbone}-{method}-s{seed}", kind)
                    diffs += [other[c] - base[c] for c in other if c in base]
                if len(diffs) >= 2:
                    mean = sum(diffs) / len(diffs)
                    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
                    cells.append(f"{100 * mean:+.1f} ± {100 * se:.1f} ({len(diffs)})")
                else:
                    cells.append("–")
            if any(c != "–" for c in cells):
                found = True
                lines.append(f"| {backbone} {method} | {' | '.join(cells)} |")
    return [*lines, *([] if found else ["| (no pair finished) | | | |"]), ""]


def _dropout_table(paths: Paths) -> list[str]:
    runs = ("dynunet-real-s0", "dynunet-real-drop30-s0")
    results = {}
    for run in runs:
        file = paths.evals / run / "subsets" / "results.json"
        if file.exists():
            results[run] = json.loads(file.read_text())["summary"]
    lines = ["### Phase dropout 0 vs 0.3 (DynUNet, real only, seed 0): tumour DSC / liver DSC per phase subset", "",
             "| phases given | dropout 0 | dropout 0.3 |", "|---|---|---|"]
    if not results:
        return [*lines, "| (no finished run) | | |", ""]
    names = list(next(iter(results.values())))
    means: dict[str, list[float]] = {r: [] for r in results}
    for name in names:
        cells = []
        for run in runs:
            values = results.get(run, {}).get(name)
            if values is None:
                cells.append("–")
                continue
            cells.append(f"{100 * values['tumor_dice']:.1f} / {100 * values['liver_dice']:.1f}")
            if name != ALL_PHASES:
                means[run].append(values["tumor_dice"])
        lines.append(f"| {name} | {' | '.join(cells)} |")
    mean_cells = [f"{100 * sum(means[r]) / len(means[r]):.1f}" if means.get(r) else "–" for r in runs]
    lines.append(f"| mean over the 14 incomplete subsets (tumour DSC) | {' | '.join(mean_cells)} |")
    return [*lines, ""]


# --------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "tables", "action"), help="run the queue, print the tables "
                        "(or, internally, one Python-API step)")
    parser.add_argument("name", nargs="?", help="the step of 'action'")
    parser.add_argument("--root", type=Path, default=Path("/tmp/exp/paper"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/exp/registered"))
    parser.add_argument("--mcs", type=Path, default=Path("/tmp/exp/mcs"))
    parser.add_argument("--median", type=Path, default=Path("/tmp/exp/normal-median"))
    parser.add_argument("--train", default=str(TRAIN), help="the d4m-train command (split like a shell)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--plan", default="small", choices=("small", "full"))
    parser.add_argument("--make-inputs", action="store_true",
                        help="also make the cohort, registration, median NCG, autoencoder and LDM (a bare machine)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--train-until", help="UTC HH:MM or +minutes: no training starts after it")
    parser.add_argument("--stop-at", help="UTC HH:MM or +minutes: no job starts after it, running ones stop")
    parser.add_argument("--only", help="comma-separated job names (default: all)")
    args = parser.parse_args(argv)
    paths = Paths(args.root, args.data, args.mcs, args.median, tuple(shlex.split(args.train)), args.device)
    if args.what == "tables":
        print(tables(paths))  # noqa: T201
        return 0
    if args.what == "action":
        run_action(paths, args.name)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    jobs = build_jobs(paths, args.plan, args.make_inputs)
    if args.only:
        chosen = set(args.only.split(","))
        jobs = [j for j in jobs if j.name in chosen]
    run_queue(jobs, paths, (_deadline(args.train_until), _deadline(args.stop_at)), args.jobs, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
