"""The paper's Table III on one GPU: each backbone real only vs hybrid, SegResNet recipes, phase dropout.

    python bench/gpu_backbones.py OUT [--device cuda] [--jobs 14] [--train-until 400] [--deadline 570]

Writes ``OUT/report.md`` (every job: exit code, seconds), ``OUT/scores.md`` (the tables) and
``OUT/results.tar.gz`` (each evaluation's ``results.json``, each run's config, metrics and post-processing
choice, the logs). The cohort, the two held-out cohorts, the split seeds, the registration, the FFC
inpainter and the `tiny` autoencoder + LDM synthesizer are those of ``bench/gpu_hybrid.sh``
(docs/results.md); each seed's synthesizer sees only that seed's training cases. The arms, by priority
(a job queue runs the highest-priority job whose inputs are ready; no training starts after
``--train-until`` seconds, no evaluation after ``--deadline``, when running jobs are stopped; a job
that succeeded is flagged in ``WORK/done/`` and skipped when the script is run again):

- ``attention-unet`` and ``swinunetr``, real only and hybrid: the Table III rows not run on the CPU;
- SegResNet: the `tiny` lr 1e-3, the same with a linear warm-up, and 3e-3 with the warm-up, real only;
  the two warm-up recipes also hybrid (run on 2026-11-27 with the `tiny` widths of then, 8-16-32-64,
  where SegResNet learnt the tumour in 3 of 6 CPU runs; the preset now gives it 16-32-64-128);
- DynUNet hybrid with phase dropout 0 and 0.3, scored with all four phases and with PVP, ART+PVP
  and PVP+DEL (the missing phases duplicated, the inference rule);
- DynUNet real only.

Hybrid = the FFC-normalized cases with 25 % synthetic groups (``--synthetic-ratio 0.25``), as
``d4m-train all --preset tiny``. Every model is scored on the 16 held-out studies with
post-processing chosen on its validation cases. Run from the repository root with d4m installed
(on the GPU machine: the wheels of ``.whl/`` and this checkout installed into a ``--target`` folder).
Results: docs/results.md, "Table III on a GPU". A CPU smoke run of every job (about 5 minutes):
``--device cpu --jobs 2 --cases 5 --held 2 --seeds 0 --seg-steps 2 --prep-steps 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics as st
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

HELD = ("held1", "held2")
ALL = "NC+ART+PVP+DEL"
MISSING = ("PVP", "ART+PVP", "PVP+DEL")
WARMUP = "80"


@dataclasses.dataclass
class Job:
    """One command; it starts once the jobs it needs succeeded (lower ``priority`` first)."""

    name: str
    command: list[str]
    needs: tuple[str, ...] = ()
    priority: int = 0
    training: bool = False
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    state: str = "waiting"  # waiting, running, ok, failed, skipped


@dataclasses.dataclass(frozen=True)
class Arm:
    """A segmenter recipe trained at each seed: backbone, real or hybrid, extra options."""

    name: str
    backbone: str
    hybrid: bool
    options: tuple[str, ...] = ()
    phase_sets: tuple[str, ...] = (ALL,)


ARMS = (
    Arm("attention-unet-real", "attention-unet", False),
    Arm("attention-unet-hybrid", "attention-unet", True),
    Arm("swinunetr-real", "swinunetr", False),
    Arm("swinunetr-hybrid", "swinunetr", True),
    Arm("segresnet-warm-real", "segresnet", False, ("--warmup-steps", WARMUP)),
    Arm("segresnet-warm3-real", "segresnet", False, ("--warmup-steps", WARMUP, "--lr", "3e-3")),
    Arm("segresnet-warm-hybrid", "segresnet", True, ("--warmup-steps", WARMUP)),
    Arm("segresnet-warm3-hybrid", "segresnet", True, ("--warmup-steps", WARMUP, "--lr", "3e-3")),
    Arm("dynunet-hybrid", "dynunet", True, phase_sets=(ALL, *MISSING)),
    Arm("dynunet-hybrid-drop30", "dynunet", True, ("--phase-dropout", "0.3"), (ALL, *MISSING)),
    Arm("segresnet-real", "segresnet", False),
    Arm("dynunet-real", "dynunet", False),
)

VIEW = """
import sys
from pathlib import Path
from d4m.training.pipeline import PipelineConfig, write_train_view
data, normalized, view, seed = sys.argv[1:]
folders = {"normalize": Path(normalized), "train-cases": Path(view)}
write_train_view(PipelineConfig(data=Path(data), seed=int(seed)), folders)
"""


def plan(args: argparse.Namespace) -> list[Job]:
    """Every job: cohorts, registration, normal CTs, synthesizers, then each arm's runs and evaluations."""
    work, device = args.work, ("--device", args.device)
    d4m = [shutil.which("d4m-train") or sys.exit("d4m-train is not on PATH"), "-q"]
    prep = ("--steps", str(args.prep_steps)) if args.prep_steps else ()
    seg = ("--steps", str(args.seg_steps)) if args.seg_steps else ()
    jobs = []
    cohorts = {"cohort": (args.cases, 0), "held1": (args.held, 1), "held2": (args.held, 2)}
    for name, (cases, seed) in cohorts.items():
        jobs.append(Job(f"phantom-{name}", [*d4m, "phantom", "--size", "small", "--no-dicom", "--min-tumor-mm", "10",
                                            "--out", f"{work}/{name}", "--cases", str(cases), "--seed", str(seed)]))
        jobs.append(Job(f"register-{name}", [*d4m, "register", "--data", f"{work}/{name}", "--out",
                                             f"{work}/{name}-reg"], (f"phantom-{name}",)))
    reg = f"{work}/cohort-reg"
    jobs.append(Job("inpainter", [*d4m, "inpainter", "--data", reg, "--out", f"{work}/inpainter", "--preset", "tiny",
                                  *device, *prep], ("register-cohort",), -1))
    jobs.append(Job("normalize", [*d4m, "normalize", "--data", reg, "--out", f"{work}/normalize", "--inpainter", "ffc",
                                  "--model", f"{work}/inpainter"], ("inpainter",), -1))
    for s in args.seeds:
        base, steps = f"{work}/s{s}", (prep or ("--steps", "40"), prep or ("--steps", "60"))
        common = ("--preset", "tiny", "--seed", str(s), *device)
        jobs += [
            Job(f"view-s{s}", [sys.executable, "-c", VIEW, f"{work}/cohort", f"{work}/normalize", f"{base}/train-cases",
                               str(s)], ("normalize",), -1),
            Job(f"ae-s{s}", [*d4m, "autoencoder", "--data", f"{base}/train-cases", "--out", f"{base}/autoencoder",
                             *common, *steps[0]], (f"view-s{s}",), -1),
            Job(f"ldm-s{s}", [*d4m, "ldm", "--data", f"{base}/train-cases", "--autoencoder", f"{base}/autoencoder",
                              "--out", f"{base}/ldm", "--mode", "per-phase", *common, *steps[1]], (f"ae-s{s}",), -1),
            Job(f"synthesize-s{s}", [*d4m, "synthesize", "--data", f"{base}/train-cases", "--out", f"{base}/synthetic",
                                     "--autoencoder", f"{base}/autoencoder", "--ldm", f"{base}/ldm", "--copies", "1",
                                     "--ddim-steps", "10", "--seed", str(s), *device], (f"ldm-s{s}",), -1),
        ]
    for priority, arm in enumerate(ARMS):
        for s in args.seeds:
            run = f"{arm.name}-s{s}"
            data = (["--data", f"{work}/normalize", "--synthetic-ratio", "0.25", "--synthetic-data",
                     f"{work}/s{s}/synthetic"] if arm.hybrid else ["--data", reg])
            needs = ("normalize", f"synthesize-s{s}") if arm.hybrid else ("register-cohort",)
            jobs.append(Job(f"seg-{run}", [*d4m, "segmenter", *data, "--out", f"{work}/runs/{run}", "--preset", "tiny",
                                           "--backbone", arm.backbone, "--seed", str(s), *device, *arm.options, *seg],
                            needs, priority, training=True))
            phases = [x for p in arm.phase_sets for x in ("--phases", p)] if arm.phase_sets != (ALL,) else []
            for h in HELD:
                jobs.append(Job(f"eval-{run}-{h}", [*d4m, "evaluate", "--model", f"{work}/runs/{run}", "--data",
                                                     f"{work}/{h}-reg", "--split", "all", "--out",
                                                     f"{work}/eval/{run}-{h}", *device, *phases],
                                (f"seg-{run}", f"register-{h}"), priority - 100))
    return jobs


def run_queue(jobs: list[Job], args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Start ready jobs by priority, ``args.jobs`` at a time, within the time limits."""
    for folder in ("logs", "done"):
        (args.work / folder).mkdir(parents=True, exist_ok=True)
    by_name, clock = {j.name: j for j in jobs}, time.monotonic()
    for job in jobs:
        if (args.work / "done" / job.name).exists():
            job.state = "ok"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    while True:
        now = time.monotonic() - clock
        for job in jobs:
            if job.state == "running" and job.process is not None and job.process.poll() is not None:
                job.state = "ok" if job.process.returncode == 0 else "failed"
                if job.state == "ok":
                    (args.work / "done" / job.name).touch()
                log(f"{job.name}: exit {job.process.returncode}, {time.monotonic() - job.started:.0f} s")
                if job.state == "failed":
                    tail = (args.work / "logs" / f"{job.name}.log").read_text(errors="replace").splitlines()[-4:]
                    log("    " + "\n    ".join(tail))
            if job.state == "waiting" and any(by_name[n].state in ("failed", "skipped") for n in job.needs):
                job.state = "skipped"
        running = [j for j in jobs if j.state == "running"]
        if now > args.deadline:
            for job in running:
                job.process.kill()  # type: ignore[union-attr]
                job.state = "failed"
                log(f"{job.name}: stopped at the deadline after {time.monotonic() - job.started:.0f} s")
            break
        ready = sorted((j for j in jobs if j.state == "waiting" and all(by_name[n].state == "ok" for n in j.needs)
                        and not (j.training and now > args.train_until)), key=lambda j: j.priority)
        for job in ready[: max(0, args.jobs - len(running))]:
            with (args.work / "logs" / f"{job.name}.log").open("wb") as out:
                job.process = subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT, env=env)
            job.state, job.started = "running", time.monotonic()
        if not running and not ready:
            break
        time.sleep(0.5)
    left = [j.name for j in jobs if j.state == "waiting"]
    log(f"queue ended after {time.monotonic() - clock:.0f} s; not started: {len(left)} {' '.join(left[:12])}")


def _scores(work: Path, run: str, phases: str = ALL, metric: str = "tumor_dice") -> list[float] | None:
    """Per-study scores of one run over both held-out cohorts, or None when an evaluation is missing."""
    scores = []
    for h in HELD:
        file = work / "eval" / f"{run}-{h}" / "results.json"
        if not file.exists():
            return None
        scores += [c[metric] for c in json.loads(file.read_text())["cases"] if c["phases"] == phases]
    return scores


def tables(work: Path, seeds: list[int]) -> str:
    """Per-arm seed means, mean ± SD over seeds, liver Dice, and paired per-study differences."""
    lines = ["Tumour Dice, mean over the held-out studies (a model that paints no tumour scores only on the "
             "tumour-free studies)", "", "| arm | given | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± SD | liver Dice |", "|---|---|" + "---:|" * (len(seeds) + 2)]
    for arm in ARMS:
        for phases in arm.phase_sets:
            means, cells, livers = [], [], []
            for s in seeds:
                values = _scores(work, f"{arm.name}-s{s}", phases)
                cells.append(f"{st.mean(values):.3f}" if values else "—")
                if values:
                    means.append(st.mean(values))
                    livers.append(st.mean(_scores(work, f"{arm.name}-s{s}", phases, "liver_dice") or [0.0]))
            spread = f"{st.mean(means):.3f} ± {st.stdev(means):.3f}" if len(means) > 1 else (
                f"{means[0]:.3f}" if means else "—")
            liver = f"{st.mean(livers):.3f}" if livers else "—"
            lines.append(f"| {arm.name} | {phases} | " + " | ".join(cells) + f" | {spread} | {liver} |")
    pairs = [(f"{b}-hybrid", f"{b}-real", ALL) for b in ("attention-unet", "swinunetr", "dynunet")]
    pairs += [(a, b, ALL) for a, b in (("segresnet-warm-hybrid", "segresnet-warm-real"),
                                       ("segresnet-warm3-hybrid", "segresnet-warm3-real"),
                                       ("segresnet-warm-real", "segresnet-real"),
                                       ("segresnet-warm3-real", "segresnet-real"))]
    pairs += [("dynunet-hybrid-drop30", "dynunet-hybrid", p) for p in (ALL, *MISSING)]
    lines += ["", "Paired differences per held-out study and seed, tumour Dice points ± SE:", ""]
    for a, b, phases in pairs:
        diffs = []
        for s in seeds:
            x, y = _scores(work, f"{a}-s{s}", phases), _scores(work, f"{b}-s{s}", phases)
            if x and y:
                diffs += [p - q for p, q in zip(x, y, strict=True)]
        if len(diffs) > 1:
            se = st.stdev(diffs) / len(diffs) ** 0.5
            lines.append(f"- {a} − {b} ({phases}): {100 * st.mean(diffs):+.1f} ± {100 * se:.1f} ({len(diffs)} pairs; "
                         f"better in {sum(d > 0 for d in diffs)}, worse in {sum(d < 0 for d in diffs)})")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d4m-backbones"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--held", type=int, default=8)
    parser.add_argument("--train-until", type=float, default=400.0, help="s: no training starts after it")
    parser.add_argument("--deadline", type=float, default=570.0, help="s: running jobs are stopped")
    parser.add_argument("--seg-steps", type=int, default=0, help="segmenter steps (0: the tiny preset's)")
    parser.add_argument("--prep-steps", type=int, default=0, help="inpainter/AE/LDM steps (0: tiny's, AE 40, LDM 60)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = (args.out / "report.md").open("w")

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S', time.gmtime())} {message}"
        print(line, flush=True)
        report.write(line + "\n")
        report.flush()

    log(f"device {args.device}, seeds {args.seeds}, {args.jobs} jobs at a time")
    run_queue(plan(args), args, log)
    scores = tables(args.work, args.seeds)
    (args.out / "scores.md").write_text(scores)
    log("\n" + scores)
    with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
        for pattern in ("eval/*/results.json", "runs/*/config.json", "runs/*/metrics.csv", "runs/*/postprocess.json",
                        "logs/*.log"):
            for file in sorted(args.work.glob(pattern)):
                tar.add(file, arcname=str(file.relative_to(args.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
