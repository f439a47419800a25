"""`streamrank report`: the README's generated sections and docs/results.md match the reproducibility tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from streamrank.errors import ConfigError
from streamrank.eval.report import report

REPO = Path(__file__).resolve().parents[2]


def copy_sources(target: Path) -> Path:
    for folder in ("configs", "eval", "experiments", "docs"):
        shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copy2(REPO / "README.md", target / "README.md")
    return target


def test_checked_in_pages_match_the_tables() -> None:
    assert report(REPO, check=True) == [], "run `streamrank report` and commit the pages"


def test_a_changed_expected_score_makes_the_pages_stale_and_report_rewrites_them(tmp_path: Path) -> None:
    root = copy_sources(tmp_path)
    table = root / "eval" / "reproducibility.toml"
    table.write_text(table.read_text().replace("expected = 0.7170", "expected = 0.7199", 1))
    stale = report(root, check=True)
    assert set(stale) == {root / "README.md", root / "docs" / "results.md"}
    assert "0.7199" not in (root / "README.md").read_text()  # --check writes nothing
    assert report(root) == stale and report(root, check=True) == []
    readme = (root / "README.md").read_text()
    assert "| `hybrid` |" in readme and "0.7199" in readme and "0.7170" not in readme.split("<!-- results:end")[0]


def test_experiment_rows_go_to_docs_results_only(tmp_path: Path) -> None:
    root = copy_sources(tmp_path)
    readme, results = (root / "README.md").read_text(), (root / "docs" / "results.md").read_text()
    assert "| first from first |" in results and "experiments/reproducibility.toml" in results
    assert "first from first" not in readme


def test_a_page_without_its_markers_is_a_clear_error(tmp_path: Path) -> None:
    root = copy_sources(tmp_path)
    (root / "README.md").write_text("# no markers\n")
    with pytest.raises(ConfigError, match="README.md: no `<!-- which-pipeline:start -->`"):
        report(root, check=True)
