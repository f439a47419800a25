"""Check the layer contracts in pyproject.toml (`[tool.importlinter]`) with import-linter.

The project maps folders to subpackages (`index/` is `streamrank.index`, ...), which import-linter cannot
follow in a checkout, so the sources are staged first as one package tree that mirrors the installed one.
Usage: python tests/check_layers.py   (exit status of lint-imports; `make lint` runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_packages(target: Path, root: Path = ROOT) -> Path:
    """Copy every package of pyproject's package-dir into ``target`` as the installed layout; returns target."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        dest = target.joinpath(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for source in (root / folder).glob("*.py"):
            shutil.copy2(source, dest / source.name)
    for package in setuptools["packages"]:  # packages found below a mapped folder (streamrank.datasets)
        if package not in setuptools["package-dir"]:
            parent, _, leaf = package.rpartition(".")
            source = root / setuptools["package-dir"][parent] / leaf
            shutil.copytree(source, target.joinpath(*package.split(".")), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    return target


def run_contracts(staged: Path, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """lint-imports over a staged tree, with the contracts of ``root``'s pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(staged))
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", str(root / "pyproject.toml")]
    return subprocess.run(command, cwd=staged, env=env, capture_output=True, text=True, timeout=300)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_contracts(stage_packages(Path(tmp)))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
