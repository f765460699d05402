"""The distribution: every package folder is listed, the wheel holds them, the runtime stays torch-free."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {"dicom_io", "runtime", "training", "export"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    found = set()
    for top in PACKAGE_ROOTS:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix().replace("/", ".")
            found.add("d4m." + rel)
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert _package_folders() == listed, "pyproject [tool.setuptools] packages must list every package folder"


def test_console_scripts_point_at_typer_apps() -> None:
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) == {"d4m-train", "d4m-export", "d4m-infer"}
    for target in scripts.values():
        assert target.endswith(".cli:app")


@pytest.mark.parametrize("module", ["d4m.runtime", "d4m.dicom_io", "d4m.runtime.cli", "d4m.dicom_io.volume"])
def test_site_runtime_never_imports_torch(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


@pytest.mark.parametrize("script", ["d4m-train", "d4m-export", "d4m-infer"])
def test_cli_help_and_version(script: str) -> None:
    exe = Path(sys.executable).parent / script
    help_out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage" in help_out
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("d4m ")


def test_wheel_holds_every_package_and_imports_from_it(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, ROOT],
        check=True,
    )
    wheel = next(tmp_path.glob("d4m-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _package_folders():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
        assert package.replace(".", "/") + "/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True)
    code = "import d4m.runtime, d4m.dicom_io; print(d4m.runtime.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip().startswith(str(site)), "d4m.runtime must import from the installed wheel"
