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
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("types.py", "from streamrank.service import app"),  # core -> front end
        ("kernels/ops.py", "from streamrank.rankers import base"),  # kernels -> stages
        ("index/fusion.py", "from streamrank.eval import metrics"),  # stage -> front end
        ("index/fusion.py", "from streamrank import compose"),  # stage -> composition root
        ("context.py", "from streamrank.stage import BaseStage"),  # core circle: stage imports context
        ("config.py", "from streamrank.compose import STAGE_KINDS"),  # core -> the stage registry
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, forbidden: str) -> None:
    staged = stage_packages(tmp_path)
    target = staged / "streamrank" / module
    typing_only = f"\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    {forbidden}\n"
    target.write_text(target.read_text() + typing_only)  # type-checking imports count too
    result = run_contracts(staged)
    assert result.returncode != 0
    importer = "streamrank." + module.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in result.stdout and importer in result.stdout, result.stdout
