"""Embedding-listwise (E2Rank) and cross-encoder rerankers, checked against direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamrank.config import read_config
from streamrank.context import PipelineContext
from streamrank.errors import ConfigError
from streamrank.models import MINILM, sentence_model_path
from streamrank.pipeline import Pipeline
from streamrank.rankers.cross_encoder import CrossEncoderReranker
from streamrank.rankers.e2rank import (
    DEFAULT_INSTRUCTION,
    EmbeddingListwise,
    EmbeddingListwiseConfig,
    fair_shares,
)
from streamrank.store import DocumentStore
from streamrank.types import Candidate, Document, Query, Ranking

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHT = EmbeddingListwiseConfig.model_fields["query_weight"].default
torch.set_num_threads(1)

QUERY = "does vitamin D supplementation prevent bone fractures in elderly people"
DOCS = [
    "Vitamin D and calcium supplements reduced hip fractures in elderly women.",
    "The stock market fell sharply on Monday after weak earnings reports.",
    "Bone mineral density improves with vitamin D in older adults.",
    "A recipe for lemon cake with a light sugar glaze.",
    "Falls and fractures among nursing home residents given cholecalciferol.",
    "Football season opens with a surprise win for the home team.",
    "Sunlight exposure is the main natural source of vitamin D.",
    "Osteoporosis treatment guidelines for postmenopausal women.",
    "Cats sleep for up to sixteen hours a day.",
    "Randomised trial: high dose vitamin D did not lower fracture risk.",
    "The history of the printing press in Europe.",
    "Calcium intake and the risk of kidney stones.",
]
LONG = " ".join(
    "Microstructural development of human newborn cerebral white matter was assessed in vivo by "
    "diffusion tensor magnetic resonance imaging in preterm and term infants.".split()
    * 6
)


@pytest.fixture(scope="session")
def context() -> PipelineContext:
    """One context without an index, so MiniLM is loaded once for the whole session."""
    ctx = PipelineContext(None, device="cpu")
    ctx.sentence_encoder(MINILM)
    return ctx


def e2rank(context: PipelineContext, **options) -> EmbeddingListwise:
    return EmbeddingListwise.from_dict({"kind": "e2rank", **options}, context)  # type: ignore[return-value]


def hand_prompt(passages: list[str]) -> str:
    """E2Rank's listwise prompt, written out independently of the stage."""
    listed = "\n".join(f"[{i}] {t}" for i, t in enumerate(passages, start=1))
    return f"{DEFAULT_INSTRUCTION}\nDocuments:\n{listed}\nSearch Query: {QUERY}"


def reference_scores(
    context: PipelineContext, prompt: str, docs: list[str], query_weight: float
) -> np.ndarray:
    encoder = context.sentence_encoder(MINILM)
    p, q = encoder.encode([prompt, QUERY], normalize_embeddings=True)
    d = encoder.encode(docs, normalize_embeddings=True)
    return (1 - query_weight) * (d @ p) + query_weight * (d @ q)


@pytest.mark.parametrize("query_weight", [0.0, 0.3, None])
def test_e2rank_matches_reference(context: PipelineContext, query_weight: float | None) -> None:
    """Short passages fit whole, so the prompt is E2Rank's template written out by hand (None: default weight)."""
    stage = e2rank(context, prompt_docs=5, **({} if query_weight is None else {"query_weight": query_weight}))
    ranking = Pipeline("t", [stage], context).rerank(QUERY, DOCS)

    prompt = hand_prompt(DOCS[:5])
    expected = reference_scores(context, prompt, DOCS, stage.config.query_weight)
    order = np.argsort(-expected, kind="stable")

    assert ranking.doc_ids() == [str(i) for i in order]
    np.testing.assert_allclose([c.score for c in ranking.candidates], expected[order], atol=1e-5)
    assert [c.rank for c in ranking.candidates] == list(range(1, len(DOCS) + 1))
    assert all(c.stage_scores["e2rank"] == c.score for c in ranking.candidates)

    (call,) = ranking.calls
    tokenizer = context.sentence_encoder(MINILM).tokenizer
    assert call.stage == "e2rank" and call.model == MINILM
    assert call.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert call.seconds > 0


def test_e2rank_embeds_a_pseudo_query_once(context: PipelineContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second stage over the same query (a tuning grid over query_weight) reuses the prompt's vector."""
    from streamrank.encoding import SentenceEncoding

    encoded: list[str] = []
    real_encode = SentenceEncoding.encode

    def spy(self: SentenceEncoding, texts, role, **kwargs):  # type: ignore[no-untyped-def]
        encoded.extend(texts)
        return real_encode(self, texts, role, **kwargs)

    monkeypatch.setattr(SentenceEncoding, "encode", spy)
    ctx = PipelineContext(None, device="cpu")
    first = Pipeline("t", [e2rank(ctx, prompt_docs=5, query_weight=0.2)], ctx).rerank(QUERY, DOCS)
    assert hand_prompt(DOCS[:5]) in encoded
    encoded.clear()
    second = Pipeline("t", [e2rank(ctx, prompt_docs=5, query_weight=0.6)], ctx).rerank(QUERY, DOCS)
    assert encoded == []  # prompt, query and passages all came from the pipeline's cache
    expected = reference_scores(ctx, hand_prompt(DOCS[:5]), DOCS, 0.6)
    np.testing.assert_allclose([c.score for c in second.candidates], np.sort(expected)[::-1], atol=1e-5)
    assert [c.score for c in first.candidates] != [c.score for c in second.candidates]


def test_e2rank_reranks_only_depth_and_keeps_tail(context: PipelineContext) -> None:
    stage = e2rank(context, depth=6, prompt_docs=3, k=10)
    ranking = Pipeline("t", [stage], context).rerank(QUERY, DOCS)
    assert sorted(ranking.doc_ids()[:6], key=int) == [str(i) for i in range(6)]
    assert ranking.doc_ids()[6:] == [str(i) for i in range(6, 10)]  # tail in incoming order, cut at k
    assert [c.rank for c in ranking.candidates] == list(range(1, 11))
    scores = [c.score for c in ranking.candidates]
    assert scores == sorted(scores, reverse=True)  # the tail is scored below the reranked head


def test_pseudo_query_truncates_passages_and_keeps_query(context: PipelineContext) -> None:
    tokenizer = context.sentence_encoder(MINILM).tokenizer
    stage = e2rank(context)
    assert stage.max_tokens() == 256
    pq = stage.pseudo_query(QUERY, [LONG] * 30)

    assert pq.text.endswith(f"\nSearch Query: {QUERY}")
    assert pq.text.startswith(DEFAULT_INSTRUCTION)
    assert pq.tokens == len(tokenizer(pq.text)["input_ids"]) <= 256
    assert len(pq.passage_tokens) == 20 and "[20] " in pq.text and "[21]" not in pq.text
    assert min(pq.passage_tokens) >= max(pq.passage_tokens) - 1 > 0  # equal shares of the budget
    assert pq.tokens >= 256 - 20  # the budget is used, not wasted

    # a short passage gives its unused share to the others, and appears whole
    mixed = stage.pseudo_query(QUERY, ["Cats sleep."] + [LONG] * 19)
    assert "[1] Cats sleep.\n" in mixed.text and mixed.passage_tokens[0] == 3
    assert min(mixed.passage_tokens[1:]) >= min(pq.passage_tokens)

    # a query too long for the encoder is cut, never the template; no passage fits
    long_query = LONG + " " + LONG
    cut = stage.pseudo_query(long_query, DOCS)
    assert cut.passage_tokens == () and cut.tokens <= 256
    assert cut.text.startswith(DEFAULT_INSTRUCTION) and "\nSearch Query: microstructural" in cut.text


def test_fair_shares() -> None:
    assert fair_shares([2, 10, 10], 15) == [2, 6, 7]
    assert fair_shares([5, 5], 100) == [5, 5]
    assert fair_shares([8, 8, 8], 0) == [0, 0, 0]
    assert fair_shares([], 10) == []


class FakeDense:
    """Stands in for index.dense.DenseRetriever: serves "stored" vectors of corpus ids d0, d1, ..."""

    name = "dense"

    def __init__(self, encoder, **settings) -> None:
        self.encoder = encoder
        self.calls: list[list[str]] = []
        self.settings = {"model": MINILM, "dtype": "float32", "document_prefix": "", "use_model_prompts": True,
                         "lowrank": None, **settings}

    def vector_settings(self) -> dict:
        return self.settings

    def embeddings_for(self, doc_ids: list[str]) -> np.ndarray:
        self.calls.append(list(doc_ids))
        return self.encoder.encode([DOCS[int(i[1:])] for i in doc_ids], normalize_embeddings=True)


def test_e2rank_uses_stored_embeddings_for_corpus_documents(tmp_path: Path, context: PipelineContext) -> None:
    """Candidates from the index take the dense stage's vectors; a supplied text under a clashing id does not."""
    encoder = context.sentence_encoder(MINILM)
    corpus = [Document(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    store = DocumentStore(tmp_path / "docs.sqlite")
    store.upsert(corpus)
    store.close()

    ctx = PipelineContext(tmp_path, device="cpu")
    ctx.shared(("sentence-encoder", MINILM), lambda: encoder)
    dense = FakeDense(encoder)
    supplied = Document(id="d1", text="Vitamin D prevents fractures.")  # same id as a corpus doc, other text
    pool = [Candidate(doc_id=d.id, score=0.0) for d in corpus]
    pool[1] = Candidate(doc_id="d1", score=0.0, document=supplied)
    stage = e2rank(ctx, prompt_docs=5, vectors_from="dense")
    stage.bind("vectors_from", dense)
    (ranking,) = stage.run([Ranking(query=Query(id="q", text=QUERY), candidates=pool)])

    (ids,) = dense.calls
    assert sorted(ids) == sorted(d.id for d in corpus if d.id != "d1")
    texts = [supplied.text if d.id == "d1" else d.text for d in corpus]
    expected = reference_scores(ctx, hand_prompt(texts[:5]), texts, DEFAULT_WEIGHT)
    assert ranking.doc_ids() == [corpus[i].id for i in np.argsort(-expected, kind="stable")]
    ctx.close()


def test_e2rank_without_corpus_ignores_dense_stage(context: PipelineContext) -> None:
    """A reranking-only pipeline (no index) that names a dense stage encodes the supplied texts."""
    encoder = context.sentence_encoder(MINILM)
    ctx = PipelineContext(None, device="cpu")
    ctx.shared(("sentence-encoder", MINILM), lambda: encoder)
    dense = FakeDense(encoder)
    stage = e2rank(ctx, prompt_docs=5, vectors_from="dense")
    stage.bind("vectors_from", dense)
    ranking = Pipeline("t", [stage], ctx).rerank(QUERY, DOCS)
    assert dense.calls == []
    expected = reference_scores(ctx, hand_prompt(DOCS[:5]), DOCS, DEFAULT_WEIGHT)
    assert ranking.doc_ids() == [str(i) for i in np.argsort(-expected, kind="stable")]


@pytest.mark.parametrize(
    ("settings", "differs"),
    [({"model": "google/embeddinggemma-300m"}, "model"), ({"dtype": "bfloat16"}, "dtype"),
     ({"use_model_prompts": False}, "use_model_prompts"), ({"lowrank": {"ratio": 0.5}}, "lowrank")],
)
def test_e2rank_refuses_a_dense_stage_whose_vectors_differ(context: PipelineContext, settings, differs) -> None:
    stage = e2rank(PipelineContext(None), vectors_from="dense")
    with pytest.raises(ConfigError, match=rf"'e2rank'.*'dense'.*{differs}: 'e2rank' needs"):
        stage.bind("vectors_from", FakeDense(None, **settings))


def test_e2rank_config_file() -> None:
    config, _ = read_config(REPO / "experiments" / "e2rank.toml")
    assert config.corpus == "scifact"
    first, rerank = config.stages
    assert first["kind"] == "fusion" and first["k"] == 100
    parsed = EmbeddingListwiseConfig.model_validate(rerank)
    assert parsed.vectors_from == "dense" and parsed.depth == 100 and parsed.prompt_docs == 20 and parsed.query_weight == 0.8


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT cross-encoder with MiniLM's tokenizer, saved to disk."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(sentence_model_path(MINILM))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        initializer_range=0.5,  # spread the random scores so the order is well defined
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_scores_equal_direct_predict(tiny_cross_encoder: Path) -> None:
    from sentence_transformers import CrossEncoder

    ctx = PipelineContext(None, device="cpu")
    stage = CrossEncoderReranker.from_dict(
        {"kind": "cross_encoder", "model": str(tiny_cross_encoder), "batch_size": 4, "max_length": 64}, ctx
    )
    ranking = Pipeline("t", [stage], ctx).rerank(QUERY, DOCS)

    direct = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=64).predict(
        [(QUERY, d) for d in DOCS]
    )
    order = np.argsort(-direct, kind="stable")
    assert len(set(np.round(direct, 6))) == len(DOCS)  # distinct scores: the order is meaningful
    assert ranking.doc_ids() == [str(i) for i in order]
    np.testing.assert_allclose([c.score for c in ranking.candidates], direct[order], rtol=1e-5, atol=1e-6)
    (call,) = ranking.calls
    assert call.stage == "cross_encoder" and call.model == str(tiny_cross_encoder) and call.seconds > 0
