"""The layer contracts (pyproject `[tool.importlinter]`) hold, and they catch a forbidden import."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from check_layers import run_contracts, stage_packages  # noqa: E402

pytestmark = pytest.mark.slow


def test_layer_contracts_hold(tmp_path: Path) -> None:
    result = run_contracts(stage_packages(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("types.py", "from streamrank.service import app"),  # core -> front end
        ("kernels/ops.py", "from streamrank.rankers import base"),  # kernels -> stages
        ("index/fusion.py", "from streamrank.eval import metrics"),  # stage -> front end
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, forbidden: str) -> None:
    staged = stage_packages(tmp_path)
    target = staged / "streamrank" / module
    target.write_text(target.read_text() + f"\n\ndef _leak() -> None:\n    {forbidden}\n")
    result = run_contracts(staged)
    assert result.returncode != 0
    importer = "streamrank." + module.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in result.stdout and importer in result.stdout, result.stdout
