"""Pointwise rerankers the field uses: Qwen3-Reranker's yes/no stage against a faithful copy of its model
card code (tiny random Qwen3, real tokenizer), and hub cross-encoders through sentence-transformers'
CrossEncoder (a tiny random BERT cross-encoder saved in the test)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402

from streamrank.config import build_stage  # noqa: E402
from streamrank.context import PipelineContext  # noqa: E402
from streamrank.errors import ModelNotFoundError, RankerError  # noqa: E402
from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm, resolve_device  # noqa: E402
from streamrank.rankers.prompts import template_data  # noqa: E402
from streamrank.types import Candidate, Document, Query, Ranking  # noqa: E402

QUERY = "how long do fleas live"
TEXTS = [
    "Adult fleas live for about two to three months on a host.",
    "The stock market fell sharply on Monday.",
    "fleas " * 300,  # cut to fit max_length
    "Paris is the capital and largest city of France.",
    "Bananas are yellow fruits rich in potassium.",
]


def ranking_of(texts: list[str]) -> Ranking:
    candidates = [
        Candidate(
            doc_id=f"d{i}", score=float(len(texts) - i), rank=i + 1, document=Document(id=f"d{i}", text=t)
        )
        for i, t in enumerate(texts)
    ]
    return Ranking(query=Query(id="q", text=QUERY), candidates=candidates)


# ---- the model card's code, copied faithfully (huggingface.co/Qwen/Qwen3-Reranker-0.6B, README) -------------
def model_card_scores(tokenizer, model, query: str, docs: list[str], max_length: int) -> tuple[list, list]:
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(  # noqa: UP032 (copied)
            instruction=instruction, query=query, doc=doc
        )
        return output

    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix = '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)

    def process_inputs(pairs):
        inputs = tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        ids = [list(x) for x in inputs["input_ids"]]
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
        return inputs, ids

    @torch.no_grad()
    def compute_logits(inputs, **kwargs):
        batch_scores = model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, token_true_id]
        false_vector = batch_scores[:, token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    task = "Given a web search query, retrieve relevant passages that answer the query"
    pairs = [format_instruction(task, query, doc) for doc in docs]
    inputs, ids = process_inputs(pairs)
    return compute_logits(inputs), ids


@pytest.fixture(scope="module")
def qwen3() -> CausalLM:
    from transformers import Qwen3ForCausalLM

    tok = tiny_models.tokenizer(padding_side="left")
    torch.manual_seed(0)
    return CausalLM(Qwen3ForCausalLM(tiny_models.qwen3_config(len(tok))).eval(), tok, "tiny-qwen3")


def yes_no_stage(llm: CausalLM, **options):
    context = PipelineContext(None)
    settings = LLMSettings()
    context.shared(settings.cache_key(resolve_device(settings)), lambda: llm)
    return build_stage({"kind": "yes_no", "depth": 5, "batch_size": 2, **options}, context, "test")


def test_yes_no_matches_the_model_card_ids_and_scores(qwen3: CausalLM) -> None:
    stage = yes_no_stage(qwen3, max_length=160)
    ranked = stage.run([ranking_of(TEXTS)])[0]
    expected, expected_ids = model_card_scores(qwen3.tokenizer, qwen3.model, QUERY, TEXTS, 160)
    assert stage.pair_ids(QUERY, TEXTS) == expected_ids
    assert max(len(x) for x in expected_ids) == 160  # the long passage was cut, the frame kept
    assert expected_ids[2][-len(qwen3.encode("</think>\n\n")) :] == qwen3.encode("</think>\n\n")
    by_doc = {c.doc_id: c.score for c in ranked.candidates}
    ours = [by_doc[f"d{i}"] for i in range(len(TEXTS))]
    assert torch.allclose(torch.tensor(ours).exp(), torch.tensor(expected), atol=1e-5)
    assert ranked.doc_ids() == [f"d{i}" for i in sorted(range(len(TEXTS)), key=lambda i: -expected[i])]
    assert len(ranked.calls) == 3  # batches of 2


def test_yes_no_template_is_the_published_text() -> None:
    t = template_data("qwen3_reranker")
    assert t["prefix"].startswith("<|im_start|>system\nJudge whether the Document meets the requirements")
    assert t["suffix"] == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert "Qwen3-Reranker" in t["source"]


def test_yes_no_constant_scores_raise(qwen3: CausalLM) -> None:
    class Flat(CausalLM):
        def forward_ids(self, ids, mask, position_ids, cache, keep):
            out = super().forward_ids(ids, mask, position_ids, cache, keep)
            out.logits = torch.zeros_like(out.logits)
            return out

    flat = Flat(qwen3.model, qwen3.tokenizer, "flat")
    with pytest.raises(RankerError, match="constant"):
        yes_no_stage(flat).run([ranking_of(TEXTS)])


def test_published_hub_ids_fail_offline_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    monkeypatch.setenv("STREAMRANK_MODELS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="make models"):
        load_causal_lm(LLMSettings(model="Qwen/Qwen3-Reranker-0.6B"), "cpu")


# ---- cross-encoders from the hub through sentence-transformers ----------------------------------------
def tiny_cross_encoder(folder: Path) -> Path:
    """A 1-layer BERT sequence classifier (one logit) with a small word-piece vocabulary, saved like a hub
    cross-encoder (config.json, weights, tokenizer)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w.lower().strip(".,") for t in [QUERY, *TEXTS] for w in t.split()})
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_loads_a_hub_style_folder_and_ranks_by_its_scores(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    folder = tiny_cross_encoder(tmp_path / "tiny-ce")
    stage = build_stage(
        {"kind": "cross_encoder", "model": str(folder), "depth": 5, "max_length": 64},
        PipelineContext(None),
        "ce",
    )
    ranked = stage.run([ranking_of(TEXTS)])[0]
    direct = CrossEncoder(str(folder), device="cpu", max_length=64).predict([(QUERY, t) for t in TEXTS])
    assert ranked.doc_ids() == [f"d{i}" for i in sorted(range(len(TEXTS)), key=lambda i: -float(direct[i]))]
    by_doc = {c.doc_id: c.score for c in ranked.candidates}
    assert all(abs(by_doc[f"d{i}"] - float(direct[i])) < 1e-5 for i in range(len(TEXTS)))


def test_cross_encoder_hub_id_offline_names_make_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    monkeypatch.setenv("STREAMRANK_MODELS", str(tmp_path))
    stage = build_stage(
        {"kind": "cross_encoder", "model": "cross-encoder/ms-marco-MiniLM-L6-v2", "depth": 5},
        PipelineContext(None),
        "ce",
    )
    with pytest.raises(ModelNotFoundError, match="make models"):
        stage.run([ranking_of(TEXTS)])
