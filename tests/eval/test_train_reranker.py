"""`streamrank train-reranker`: examples, losses, the loop's batches, and FIRST / groupwise / E2Rank
trained end to end on the tiny dataset with the real SmolLM2-135M and MiniLM (each loaded once)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamrank
from streamrank import compose as registry
from streamrank.cli import main
from streamrank.datasets import load_dataset
from streamrank.errors import ConfigError, RankerError, StreamRankError
from streamrank.eval.training import RerankerTraining, train_reranker
from streamrank.eval.training.examples import (
    Example,
    pseudo_queries,
    pseudo_query,
    target_order,
    training_queries,
    windows_of,
)
from streamrank.eval.training.loop import batch_indices, compute_context
from streamrank.stage import BaseStage
from streamrank.types import Candidate, Document, Ranking

torch = pytest.importorskip("torch")


class TopicPool(BaseStage):
    """Test first stage: for "topicN question", topics N, N+1, N+2, each distractor above its key answer."""

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        out = []
        for r in rankings:
            n = int(r.query.text.split()[0].removeprefix("topic"))
            ids = [f"{kind}{(n + i) % 40}" for i in range(3) for kind in ("dis", "rel")]
            pool = [Candidate(d, 0.0) for d in ids]
            out.append(r.rescored(self.name, [-float(i) for i in range(len(ids))], candidates=pool))
        return out


# ---- examples, losses, batches (no model) ---------------------------------------------------------
def test_target_order_puts_judged_first_then_the_teacher_then_the_first_stage() -> None:
    ids = ["a", "b", "c", "d", "e"]
    order, relevant = target_order(ids, {"d": 1, "e": 2, "a": 0})
    assert order == (4, 3, 0, 1, 2) and relevant == 2
    order, _ = target_order(ids, {"d": 1}, teacher={"c": 0, "a": 1})
    assert order == (3, 2, 0, 1, 4)  # teacher's c, a; then b, e (not returned by it) in first-stage order
    example = Example("q", "query", tuple(ids), order, 1)
    window = example.window([1, 2, 3])  # b, c, d
    assert window.doc_ids == ("b", "c", "d") and window.target == (2, 1, 0) and window.relevant == 1
    assert windows_of([example], lambda n: [range(0, 3), range(3, 5)], need_signal=True) == [
        example.window([3, 4])
    ]


def test_pseudo_queries_use_titles_else_first_sentences() -> None:
    docs = [
        Document("1", "Body one. More.", title="wing in a slipstream"),
        Document("2", "Heat transfer in a boundary layer. Then more."),
        Document("3", "too short", title=""),
    ]
    assert pseudo_query(docs[0]) == "wing in a slipstream"
    assert pseudo_query(docs[1]) == "Heat transfer in a boundary layer."
    assert pseudo_query(docs[2]) is None
    source = pseudo_queries(docs, 10, seed=0)
    assert source.kind == "pseudo-queries" and len(source.queries) == 2
    assert "1 titles, 1 first sentences" in source.description
    assert all(source.qrels[q.id] == {q.id.removeprefix("pseudo-"): 1} for q in source.queries)


def test_a_set_without_train_qrels_trains_on_pseudo_queries(tiny_dataset: Path) -> None:
    (tiny_dataset / "qrels" / "train.tsv").unlink()
    source = training_queries(load_dataset(str(tiny_dataset)), "train", limit=5, seed=1)
    assert source.kind == "pseudo-queries" and len(source.queries) == 5
    assert "first sentences" in source.description  # the tiny corpus has no titles


def test_batches_cover_each_epoch_and_depend_only_on_seed_and_step() -> None:
    first_epoch = [i for step in range(3) for i in batch_indices(6, step, 2, seed=3)]
    assert sorted(first_epoch) == list(range(6))
    assert batch_indices(6, 4, 4, seed=3) == batch_indices(6, 4, 4, seed=3)
    assert batch_indices(6, 1, 4, seed=3) != batch_indices(6, 1, 4, seed=4)
    assert len(batch_indices(3, 5, 8, seed=0)) == 3


def test_weighted_ranknet_prefers_the_target_order_and_weights_the_top() -> None:
    from streamrank.eval.training.losses import first_token_loss, weighted_ranknet

    ranks = torch.tensor([0, 1, 2])
    good, bad = (
        weighted_ranknet(torch.tensor([3.0, 2.0, 1.0]), ranks),
        weighted_ranknet(torch.tensor([1.0, 2.0, 3.0]), ranks),
    )
    assert good < bad
    top_swapped = weighted_ranknet(torch.tensor([2.0, 3.0, 1.0]), ranks)
    bottom_swapped = weighted_ranknet(torch.tensor([3.0, 1.0, 2.0]), ranks)
    assert top_swapped > bottom_swapped  # a mistake at the top costs more
    vocab = torch.zeros(10, requires_grad=True)
    ce, ranknet = first_token_loss(vocab, torch.tensor([4, 7]), torch.tensor([1, 0]))
    (ce + ranknet).backward()
    assert vocab.grad[7] < 0 < vocab.grad[4]  # raise the best passage's identifier, lower the other


def test_bfloat16_training_runs_the_forward_under_autocast_and_float32_does_not() -> None:
    layer = torch.nn.Linear(4, 4)
    with compute_context("bfloat16", "cpu"):
        low = layer(torch.ones(1, 4))
    with compute_context("float32", "cpu"):
        full = layer(torch.ones(1, 4))
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # the weights (and so the optimizer) stay float32
    torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("order", ["shuffled", "first-stage"])
def test_llm_examples_are_shuffled_or_kept_in_first_stage_order(order: str) -> None:
    from types import SimpleNamespace

    from streamrank.eval.training.llm_student import LLMStudent

    texts = {f"d{i}": f"passage {i}" for i in range(8)}
    seen: list[list[str]] = []
    fake = SimpleNamespace(order=order, texts=texts, prompt=lambda q, passages: seen.append(list(passages)))
    example = Example("q", "query", tuple(texts), (3, 0, 1, 2, 4, 5, 6, 7), 1)
    _, ranks = LLMStudent.prompts(fake, example, np.random.default_rng(0))
    rank_of = {doc: rank for rank, doc in enumerate(example.doc_ids[i] for i in example.target)}
    assert ranks == [rank_of[f"d{p.split()[1]}"] for p in seen[0]]  # each passage keeps its target rank
    in_order = seen[0] == [texts[d] for d in example.doc_ids]
    assert in_order == (order == "first-stage")


# ---- the real models ------------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _load_models_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 and MiniLM are loaded once per session; trained folders load for real."""
    from streamrank import models
    from streamrank.rankers import causal_lm_loading

    real_llm, real_encoder = causal_lm_loading.load_causal_lm, models.load_sentence_encoder

    def llm(settings: Any, device: str | None = None) -> Any:
        if not models.is_smollm2(settings.model):
            return real_llm(settings, device)
        if "smollm2" not in _MODELS:
            _MODELS["smollm2"] = real_llm(settings, device)
        return _MODELS["smollm2"]

    def encoder(name: str, device: str | None = None, dtype: str = "float32") -> Any:
        if name != models.MINILM:
            return real_encoder(name, device, dtype)
        if "minilm" not in _MODELS:
            _MODELS["minilm"] = real_encoder(name, device, dtype)
        return _MODELS["minilm"]

    monkeypatch.setattr(causal_lm_loading, "load_causal_lm", llm)
    monkeypatch.setattr(models, "load_sentence_encoder", encoder)
    monkeypatch.setitem(registry.STAGE_KINDS, "topics", f"{__name__}:TopicPool")


FIRST = '[[stages]]\nkind = "first"\ndepth = 4\nwindow = 4\nstride = 2\nk = 6\n'
GROUPWISE = '[[stages]]\nkind = "groupwise"\ndepth = 6\ngroup_size = 4\nanchors = 1\nk = 6\n'
E2RANK = '[[stages]]\nkind = "e2rank"\ndepth = 6\nprompt_docs = 3\nk = 6\n'


def pipeline_file(
    tmp_path: Path, data: Path, reranker: str, llm: str | None = "smollm2", name: str = "p"
) -> Path:
    text = f'name = "{name}"\ncorpus = "{data}"\nindex_dir = "{tmp_path / "idx"}"\n'
    text += '[[stages]]\nkind = "topics"\n' + reranker
    if llm is not None:
        text += f'  [stages.llm]\n  model = "{llm}"\n  max_passage_tokens = 16\n'
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_the_test_split_is_refused(tmp_path: Path, tiny_dataset: Path) -> None:
    config = pipeline_file(tmp_path, tiny_dataset, FIRST)
    with pytest.raises(StreamRankError, match="refusing to train a reranker on the test split"):
        train_reranker(str(tiny_dataset), config, split="test")
    assert main(["train-reranker", "-d", str(tiny_dataset), "-p", str(config), "--split", "test"]) == 2


def student_losses(
    stage_toml: str, tmp_path: Path, data: Path, steps: int, lr: float, llm: str | None
) -> list[float]:
    """Losses of ``steps`` optimizer steps on one fixed batch of the stage's examples."""
    from streamrank.eval.training.loop import shuffle_rng
    from streamrank.eval.training.rerankers import _student, document_texts, make_examples

    pipe = streamrank.load_pipeline(pipeline_file(tmp_path, data, stage_toml, llm), corpus=str(data))
    try:
        pipe.index()
        options = RerankerTraining(steps=steps, lr=lr, batch_size=2)
        examples, _ = make_examples(pipe, 1, str(data), "train", None, 4, options, tmp_path / "work")
        student, settings = _student(pipe.stages[1], document_texts(pipe, examples), options)
        optimizer = torch.optim.AdamW(list(student.trainable().values()), lr=lr)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            torch.manual_seed(0)
            loss, parts = student.loss(examples[:2], shuffle_rng(0, 0))  # the same batch, the same order
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert set(parts) and settings.batch_size == 2
    finally:
        pipe.close()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "lr"), [(FIRST, 3e-3), (GROUPWISE, 3e-3)], ids=["first", "groupwise"])
def test_the_llm_loss_goes_down_on_a_fixed_batch(
    stage: str, lr: float, tmp_path: Path, tiny_dataset: Path
) -> None:
    losses = student_losses(stage, tmp_path, tiny_dataset, 4, lr, "smollm2")
    assert losses[-1] < losses[0], losses


def test_the_e2rank_loss_goes_down_on_a_fixed_batch(tmp_path: Path, tiny_dataset: Path) -> None:
    losses = student_losses(E2RANK, tmp_path, tiny_dataset, 4, 1e-4, None)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_first_trains_resumes_saves_and_the_folder_ranks(tmp_path: Path, tiny_dataset: Path) -> None:
    data = tiny_dataset
    config = pipeline_file(tmp_path, data, FIRST)
    options = RerankerTraining(steps=2, checkpoint_every=1, lr=1e-3)
    straight = train_reranker(str(data), config, output=tmp_path / "straight", limit=6, options=options)
    record = json.loads((straight / "training.json").read_text())
    assert record["recipe"] == "FIRST" and record["steps"] == 2 and len(record["loss_curve"]) == 2
    assert record["source"] == "qrels" and record["teacher"] is None and record["examples_per_second"] > 0
    assert record["settings"]["dtype"] == "auto" and record["compute_dtype"] in ("float32", "bfloat16")
    assert (straight / "config.json").exists() and (straight / "tokenizer.json").exists()

    half = RerankerTraining(steps=1, checkpoint_every=1, lr=1e-3)
    resumed = tmp_path / "resumed"
    train_reranker(str(data), config, output=resumed, limit=6, options=half)
    train_reranker(str(data), config, output=resumed, limit=6, options=options, resume=True)
    a = torch.load(straight / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint" / "state.pt", weights_only=False)
    assert a["log"]["losses"] == pytest.approx(b["log"]["losses"], abs=1e-5)
    for name, value in a["params"].items():
        torch.testing.assert_close(value, b["params"][name], atol=1e-6, rtol=1e-5)
    assert json.loads((resumed / "training.json").read_text())["resumed_from"] == 1

    trained = streamrank.load_pipeline(
        pipeline_file(tmp_path, data, FIRST, llm=str(straight), name="t"), corpus=str(data)
    )
    try:
        trained.index()
        ranking = trained.search("topic33 question", k=6)
        assert len(ranking.candidates) == 6 and "first" in ranking.candidates[0].stage_scores
        assert any(call.model == str(straight) for call in ranking.calls)
        stage = trained.stages[1]
        constant = lambda sequences, ids, **kw: (torch.zeros(len(sequences), len(ids)), None)  # noqa: E731
        stage.llm.next_token_logits = constant
        with pytest.raises(RankerError, match="constant"):
            trained.search("topic34 question", k=6)
        from streamrank.rankers.listwise import identifier_logits
        from streamrank.rankers.prompts import ListwisePrompt

        prompt = stage.window_prompt("topic35 question", ["a b c", "d e f"])
        label_ids = (prompt.label_ids[0], -1)
        broken = ListwisePrompt(prompt.prefix, prompt.body, prompt.labels, label_ids, prompt.passage_tokens)
        with pytest.raises(RankerError, match="no single token"):
            identifier_logits(stage.llm, broken, None)
    finally:
        trained.close()


def test_heldout_examples_are_kept_out_and_both_models_reported(tmp_path: Path, tiny_dataset: Path) -> None:
    from streamrank.eval.training.rerankers import hold_out

    examples = [Example(f"q{i}", "q", ("a", "b"), (0, 1), 1) for i in range(10)]
    kept, held = hold_out(examples, 3, seed=0)
    assert len(held) == 3 and len(kept) == 7 and not {e.query_id for e in kept} & {e.query_id for e in held}
    assert hold_out(examples, 3, seed=0) == (kept, held) and hold_out(examples, 0, seed=0) == (examples, [])
    with pytest.raises(ConfigError, match="leaves nothing"):
        hold_out(examples, 10, seed=0)

    config = pipeline_file(tmp_path, tiny_dataset, FIRST)
    options = RerankerTraining(steps=1, lr=1e-3, heldout=2)
    out = train_reranker(str(tiny_dataset), config, output=tmp_path / "held", limit=6, options=options)
    record = json.loads((out / "training.json").read_text())
    for model in ("trained", "untrained"):
        report = record["heldout"][model]
        assert report["examples"] == 2 and sum(report["top_position_counts"]) == 2
        assert 0 <= report["top1_relevant"] <= 1 and 0 < report["mrr"] <= 1  # every window holds a relevant passage
    assert record["examples"] == len(json.loads((out / "checkpoint" / "examples.json").read_text())["examples"]) - 2


@pytest.mark.slow
def test_e2rank_trains_resumes_and_the_folder_ranks(tmp_path: Path, tiny_dataset: Path) -> None:
    data = tiny_dataset
    config = pipeline_file(tmp_path, data, E2RANK, llm=None)
    options = RerankerTraining(steps=2, batch_size=3, list_size=4, checkpoint_every=1)
    straight = train_reranker(str(data), config, output=tmp_path / "e2", limit=6, options=options)
    resumed = tmp_path / "e2-resumed"
    train_reranker(
        str(data),
        config,
        output=resumed,
        limit=6,
        options=RerankerTraining(**{**options.__dict__, "steps": 1}),
    )
    train_reranker(str(data), config, output=resumed, limit=6, options=options, resume=True)
    a = torch.load(straight / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint" / "state.pt", weights_only=False)
    for name, value in a["params"].items():
        torch.testing.assert_close(value, b["params"][name], atol=1e-6, rtol=1e-5)
    record = json.loads((straight / "training.json").read_text())
    assert record["recipe"] == "E2Rank" and record["base_model"].endswith("all-MiniLM-L6-v2")

    trained_config = tmp_path / "e2-trained.toml"
    trained_config.write_text(
        config.read_text().replace('kind = "e2rank"\n', f'kind = "e2rank"\nmodel = "{straight}"\n')
    )
    trained = streamrank.load_pipeline(trained_config, corpus=str(data))
    try:
        trained.index()
        ranking = trained.search("topic33 question", k=6)
        assert len(ranking.candidates) == 6 and np.isfinite(ranking.candidates[0].stage_scores["e2rank"])
        assert any(call.model == str(straight) for call in ranking.calls)
    finally:
        trained.close()
