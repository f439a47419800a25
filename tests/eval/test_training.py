"""`streamrank train-ranker` and `streamrank tune`: refusals, grid parsing, cross-validation, and
training a ranker and a grid search end to end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import streamrank
from streamrank import compose as registry
from streamrank.cli import main
from streamrank.errors import ConfigError, StreamRankError
from streamrank.eval.training import (
    cross_validated_gain,
    fit_ranker_model,
    grid_points,
    parse_grid,
    train_ranker,
    tune_stage,
)
from streamrank.rankers.learned import LearnedConfig, RankerModel, feature_names
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, Query, Ranking


# ---- train-ranker ----------------------------------------------------------------------------------
def test_training_the_ranker_on_the_test_split_is_refused() -> None:
    with pytest.raises(StreamRankError, match="refusing to train the ranker on the test split"):
        train_ranker("scifact", "configs/learned.toml", split="test")


class KeyPrior(BaseStage):
    """Test stage: a second generator score, 1 for the (relevant) documents tagged "key"."""

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        self.context.attach_documents(rankings)
        return [
            r.rescored(self.name, [float("key" in c.document.text) for c in r.candidates]) for r in rankings
        ]


def test_train_ranker_end_to_end(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "overlap", "fake_stages:Overlap")
    monkeypatch.setitem(registry.STAGE_KINDS, "prior", f"{__name__}:KeyPrior")
    data = tiny_dataset
    model_path = tmp_path / "models" / "ranker.txt"
    config = tmp_path / "learned.toml"
    config.write_text(
        f'name = "tiny"\ncorpus = "{data}"\nindex_dir = "{tmp_path / "idx"}"\n'
        '[[stages]]\nkind = "overlap"\nk = 100\n'
        '[[stages]]\nkind = "prior"\n'
        f'[[stages]]\nkind = "learned"\nmodel_path = "{model_path}"\nmin_data_in_leaf = 2\nnum_trees = 30\n'
    )
    written = train_ranker(str(data), config, split="train")
    assert written == model_path and model_path.is_file()
    meta = json.loads(model_path.with_name("ranker.txt.json").read_text())
    assert meta["stage_keys"] == ["overlap", "prior"] and meta["split"] == "train" and meta["queries"] == 30
    assert RankerModel.load(model_path).features == feature_names(["overlap", "prior"])

    pipeline = streamrank.load_pipeline(config, corpus=str(data))
    results = pipeline.search_batch([f"topic{q} question" for q in range(30, 40)], k=2)
    assert all(r.candidates[0].doc_id.startswith("rel") for r in results)  # the distractor shares more words
    assert "learned" in results[0].candidates[0].stage_scores

    with pytest.raises(StreamRankError, match="too few"):
        fit_ranker_model([Ranking(Query("q", "x"), [Candidate("d", 1.0)])], {}, LearnedConfig(kind="learned"))


# ---- tune ----------------------------------------------------------------------------------------
def test_grid_values_are_toml_literals_or_strings() -> None:
    grid = parse_grid(["weight=0.1, 0.25", "fusion=rrf,interpolate", "seeds=5", "on=true"])
    assert grid == {"weight": [0.1, 0.25], "fusion": ["rrf", "interpolate"], "seeds": [5], "on": [True]}
    assert len(grid_points(grid)) == 4 and grid_points(grid)[1] == {
        "weight": 0.1,
        "fusion": "interpolate",
        "seeds": 5,
        "on": True,
    }
    for bad in ("weight", "=1", "weight="):
        with pytest.raises(ConfigError, match="OPTION=VALUE"):
            parse_grid([bad])


def test_cross_validation_sees_through_selection_noise() -> None:
    rng = np.random.default_rng(1)
    reference = rng.random(400)
    better = np.vstack([reference + 0.1, reference])
    gain, _ = cross_validated_gain(better, reference)
    assert gain == pytest.approx(0.1)
    noise = reference + rng.normal(0, 0.2, size=(40, 400))  # 40 settings, none better in truth
    in_sample = noise.mean(axis=1).max() - reference.mean()
    cv_gain, _ = cross_validated_gain(noise, reference)
    assert in_sample > 0.01 and cv_gain < in_sample / 2
    with pytest.raises(StreamRankError, match="too few"):
        cross_validated_gain(noise[:, :3], reference[:3])


def test_tuning_on_the_test_split_is_refused() -> None:
    with pytest.raises(StreamRankError, match="refusing to tune a stage on the test split"):
        tune_stage("scifact", "configs/ppr.toml", {"weight": [0.1]}, split="test")


# ---- a grid search end to end with test stages (control flow) -------------------------------------
class KeyMixConfig(StageConfig):
    weight: float = 0.0


class KeyMix(BaseStage):
    """Test stage: (1 - weight) x incoming score + weight x 10 for documents saying "key"."""

    Config = KeyMixConfig
    config: KeyMixConfig

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        self.context.attach_documents(rankings)
        w = self.config.weight
        return [
            r.rescored(
                self.name, [(1 - w) * c.score + w * 10 * ("key" in c.document.text) for c in r.candidates]
            )
            for r in rankings
        ]


def test_tune_finds_the_better_setting_and_reports_it(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "overlap", "fake_stages:Overlap")
    monkeypatch.setitem(registry.STAGE_KINDS, "keymix", f"{__name__}:KeyMix")
    config = tmp_path / "p.toml"
    config.write_text(
        f'name = "tiny"\ncorpus = "{tiny_dataset}"\nindex_dir = "{tmp_path / "idx"}"\n'
        '[[stages]]\nkind = "overlap"\n[[stages]]\nkind = "keymix"\nweight = 0.0\n'
    )
    out = tmp_path / "tuned"
    rc = main(
        ["tune", "-d", str(tiny_dataset), "-p", str(config), "-g", "weight=0.0,0.5,1.0", "-o", str(out)]
    )
    assert rc == 0
    result = json.loads((out / "tune.json").read_text())
    scores = {p["options"]["weight"]: p["nDCG@10"] for p in result["points"]}
    assert result["queries"] == 30 and result["stage"] == "keymix"
    # the distractor repeats the query's words: the overlap alone ranks it first; "key" fixes that
    assert result["incoming"] == pytest.approx(scores[0.0]) == pytest.approx(result["configured"])
    assert scores[1.0] == pytest.approx(1.0) and scores[0.0] < 0.7
    assert result["best"]["options"] == {"weight": 0.5} or result["best"]["options"] == {"weight": 1.0}
    assert result["cross_validated_gain_over_incoming"]["mean"] == pytest.approx(1.0 - scores[0.0])
    printed = capsys.readouterr().out
    assert "| (as configured) |" in printed and "weight = " in printed

    with pytest.raises(ConfigError, match="unknown key 'wieght'"):
        tune_stage(str(tiny_dataset), config, {"wieght": [1.0]})
    with pytest.raises(ConfigError, match="no top-level stage named 'ppr'"):
        tune_stage(str(tiny_dataset), config, {"weight": [1.0]}, stage="ppr")


def test_tune_a_real_ppr_stage_over_bm25(tmp_path: Path, tiny_dataset: Path) -> None:
    """Real pyserini BM25, MiniLM graph and PPR: PPR with fusion weight 0 keeps the incoming top 10."""
    config = tmp_path / "ppr.toml"
    config.write_text(
        f'name = "tiny-ppr"\ncorpus = "{tiny_dataset}"\nindex_dir = "{tmp_path / "idx"}"\n'
        '[[indexes]]\nkind = "dense"\n[[stages]]\nkind = "bm25"\nk = 20\n'
        '[[stages]]\nkind = "ppr"\nneighbors = 3\nseeds = 3\nexpand = 5\nk = 20\n'
    )
    result = tune_stage(str(tiny_dataset), config, {"weight": [0.0, 1.0], "alpha": [0.15, 0.5]}, folds=3)
    scores = {(p["options"]["weight"], p["options"]["alpha"]): p["nDCG@10"] for p in result["points"]}
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores[(0.0, 0.15)] == pytest.approx(result["incoming"]) == pytest.approx(scores[(0.0, 0.5)])
    assert result["best"]["nDCG@10"] == max(scores.values())
