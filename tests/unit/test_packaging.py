"""The wheel and sdist carry everything the package reads at run time (.ci/run builds and installs them)."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

from flux2_lora.resources import launch_dir, recipes_dir, resource_dir

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_is_listed() -> None:
    listed = set(_setuptools()["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "flux2_lora").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"


def test_every_run_time_file_is_package_data() -> None:
    cfg = _setuptools()
    mapped = {pkg: ROOT / folder for pkg, folder in cfg["package-dir"].items()}
    globs = cfg["package-data"]
    for top in ("recipes", "launch"):
        for f in (ROOT / top).rglob("*"):
            if not f.is_file():
                continue
            rel = f.relative_to(ROOT / top)
            base = next(pkg for pkg, folder in mapped.items() if folder == ROOT / top)
            pkg = ".".join([base, *rel.parent.parts])
            assert pkg in cfg["packages"], f"{f}: add {pkg} to [tool.setuptools] packages"
            assert any(fnmatch.fnmatch(rel.name, g) for g in globs.get(pkg, [])), f"{f}: not in package-data"


def test_the_checkout_reads_its_top_level_folders() -> None:
    assert resource_dir("recipes") == ROOT / "recipes" and (recipes_dir() / "tiny.yaml").is_file()
    assert (launch_dir() / "slurm" / "single-node.sbatch").is_file()
