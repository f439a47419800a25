"""Pipeline files: every shipped one loads, `extends` + `[override.<stage>]` compose files, stages refer to
stages by name (checked at load time), and a pipeline runs from a named stage on supplied candidates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streamrank.compose import load_pipeline
from streamrank.config import CONFIG_DIR, read_config
from streamrank.errors import ConfigError
from streamrank.types import Candidate, Document, Query, Ranking

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(CONFIG_DIR.glob("*.toml"))
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.toml") if not p.name.startswith("reproducibility"))


def test_configs_hold_the_supported_pipelines_and_experiments_the_rest() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"bm25", "dense", "hybrid", "dense-gemma", "hybrid-gemma", "ppr", "learned", "splade"} <= names
    assert len(SHIPPED) <= 12 and not (CONFIG_DIR / "rerank-only").exists()  # --from-stage replaced it
    assert names.isdisjoint(p.stem for p in EXPERIMENTS)
    for path in SHIPPED:  # each supported pipeline says what it is for (the README's table reads it)
        assert read_config(path)[0].use_for, path


PUBLISHED = sorted((CONFIG_DIR / "published").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED + PUBLISHED + EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_pipeline_file_loads_with_its_references_bound(path: Path) -> None:
    """Each file parses, every stage table validates and every stage reference resolves (nothing is
    loaded: no corpus). Healed low-rank configs name factors their `streamrank compress` line makes first;
    only that may be missing."""
    try:
        pipeline = load_pipeline(path, corpus="")
    except ConfigError as exc:
        assert "has no lowrank.json" in str(exc) and "written by: streamrank compress" in path.read_text(), exc
        return
    try:
        assert pipeline.stages
        for stage in pipeline.iter_stages():
            for key in stage.references():
                assert stage.dependencies() or key == "vectors_from", (stage, key)
    finally:
        pipeline.close()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_extends_appends_stages_and_overrides_a_nested_stage_by_name(tmp_path: Path) -> None:
    child = write(
        tmp_path,
        "child",
        'name = "child"\nextends = "hybrid"\n[override.dense]\nmodel = "other/model"\nk = 50\n'
        '[override.fusion]\nk = 100\n[[stages]]\nkind = "score_fusion"\nstages = ["fusion"]\n',
    )
    config, _ = read_config(child)
    base, _ = read_config("hybrid")
    assert config.name == "child" and config.corpus == base.corpus
    fusion, added = config.stages
    assert fusion["k"] == 100 and added["kind"] == "score_fusion"
    bm25, dense = fusion["retrievers"]
    assert bm25 == base.stages[0]["retrievers"][0]
    assert dense["model"] == "other/model" and dense["k"] == 50 and dense["query_dtype"] == "auto"
    assert base.stages[0]["retrievers"][1]["model"] == "sentence-transformers/all-MiniLM-L6-v2"  # base untouched


def test_extends_resolves_next_to_the_file_first_and_refuses_a_circle(tmp_path: Path) -> None:
    write(tmp_path, "base", 'name = "base"\n[[stages]]\nkind = "bm25"\nk = 7\n')
    config, _ = read_config(write(tmp_path, "mid", 'name = "mid"\nextends = "base"\n'))
    assert config.stages == [{"kind": "bm25", "k": 7}]
    write(tmp_path, "a", 'name = "a"\nextends = "b"\n')
    write(tmp_path, "b", 'name = "b"\nextends = "a"\n')
    with pytest.raises(ConfigError, match="circle"):
        read_config(tmp_path / "a.toml")


def test_an_override_naming_no_stage_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "x", 'name = "x"\nextends = "hybrid"\n[override.dnese]\nk = 5\n')
    with pytest.raises(ConfigError, match=r"\[override.dnese\] names no stage.*fusion, bm25, dense"):
        read_config(path)


def test_a_reference_to_a_missing_stage_names_both(tmp_path: Path) -> None:
    path = write(
        tmp_path, "x", 'name = "x"\n[[stages]]\nkind = "bm25"\n[[stages]]\nkind = "e2rank"\nvectors_from = "dense"\n'
    )
    with pytest.raises(ConfigError, match="stage 'e2rank': vectors_from = 'dense' names no other stage.*bm25"):
        load_pipeline(path, corpus="")


def test_a_reference_to_a_stage_of_another_model_names_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x",
        'name = "x"\nextends = "hybrid"\n[[stages]]\nkind = "e2rank"\nmodel = "google/embeddinggemma-300m"\n'
        'vectors_from = "dense"\n',
    )
    with pytest.raises(
        ConfigError, match=r"stage 'e2rank': vectors_from = 'dense'.*model: 'e2rank' needs 'google/embeddinggemma-300m', "
        r"'dense' has 'sentence-transformers/all-MiniLM-L6-v2'"
    ):
        load_pipeline(path, corpus="")
    bm25_ref = write(tmp_path, "y", 'name = "y"\nextends = "hybrid"\n[[stages]]\nkind = "ppr"\nvectors_from = "bm25"\n')
    with pytest.raises(ConfigError, match="stage 'ppr': vectors_from = 'bm25' names a BM25Retriever"):
        load_pipeline(bm25_ref, corpus="")


def test_the_old_dense_model_key_says_what_replaced_it(tmp_path: Path) -> None:
    path = write(tmp_path, "x", 'name = "x"\nextends = "hybrid"\n[[stages]]\nkind = "ppr"\ndense_model = "m"\n')
    with pytest.raises(ConfigError, match="`dense_model` was replaced by `vectors_from`"):
        load_pipeline(path, corpus="")


def test_from_stage_runs_the_named_stage_on_on_supplied_candidates(tmp_path: Path, monkeypatch) -> None:
    from streamrank import compose

    sys.path.insert(0, str(REPO / "tests"))
    monkeypatch.setitem(compose.STAGE_KINDS, "reverse", "fake_stages:Reverse")
    path = write(tmp_path, "x", 'name = "x"\n[[stages]]\nkind = "bm25"\n[[stages]]\nkind = "reverse"\nname = "last"\nk = 2\n')
    pipeline = load_pipeline(path, corpus="")
    try:
        with pytest.raises(ConfigError, match="no top-level stage 'nope' \\(stages: bm25, last\\)"):
            pipeline.from_stage("nope")
        tail = pipeline.from_stage("last")
        assert [s.name for s in tail.stages] == ["last"] and tail.context is pipeline.context
        pool = [Candidate(doc_id=str(i), score=1.0 - i / 10, document=Document(id=str(i), text="t")) for i in range(3)]
        (out,) = tail.run([Ranking(query=Query(id="q", text="q"), candidates=pool)])
        assert out.doc_ids() == ["2", "1"] and "bm25" not in out.timings_ms
    finally:
        pipeline.close()
