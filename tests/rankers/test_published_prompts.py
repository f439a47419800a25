"""Published listwise prompts against rank_llm 0.25.7 itself: FIRST (rank_zephyr_alpha), RankZephyr, RankGPT.

For several queries and 20 candidates (some long enough to be cut, some with mojibake, curly quotes, HTML
entities and "[n]" references), our prompt must be the very string rank_llm's RankListwiseOSLLM.create_prompt
builds (same inference handler, same fitting loop, same chat template) and the very token ids its tokenizer
call gives; FIRST's prompt adds exactly one token, the answer's "[". The template files must hold the text of
the wheel's yaml templates (which equal castorini/rank_llm HEAD's, see the files' comments). The tokenizer is
SmolLM2-135M-Instruct's (packaged offline), with its own ChatML template and with Zephyr's.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("ftfy")

from reference_rank_llm import ListwiseOSLLM, template  # noqa: E402

from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.causal_lm_loading import LLMSettings  # noqa: E402
from streamrank.rankers.listwise import order_from_logits  # noqa: E402
from streamrank.rankers.prompts import PromptBuilder, listwise_template  # noqa: E402

ZEPHYR_CHAT = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
"""HuggingFaceH4/zephyr-7b-beta's chat template (RankZephyr's and FIRST's base model)."""

QUERIES = [
    "how long do fleas live",
    "what is the \u201cbest\u201d way to cook rice [1]",
    "definition of mojibake don\u00e2\u20ac\u2122t   &amp; tabs\tand  spaces",
]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def passages(seed: int) -> list[str]:
    """20 candidates: short, long (hundreds of words: cut to fit 4,096 tokens), messy."""
    out = []
    for i in range(20):
        n = 12 + (seed * 7 + i * 13) % 40
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
        if i % 2 == 1:
            text = " ".join([text] * 14)  # hundreds of words: over the 300-word cap, and 20 do not fit 4,096
        if i % 4 == 2:
            text = f"  It\u2019s \u201cquoted\u201d, caf\u00c3\u00a9 &amp; [3] see [12]\n\n{text}  "
        out.append(text)
    return out


@pytest.fixture(scope="module", params=["own", "zephyr"])
def llm(request: pytest.FixtureRequest) -> CausalLM:
    """SmolLM2's real tokenizer (with its chat template or Zephyr's) over a tiny random Llama."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from streamrank.models import smollm2_gguf_path
    from streamrank.rankers.causal_lm_loading import unpacked_gguf

    try:
        folder = unpacked_gguf(smollm2_gguf_path())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if request.param == "zephyr":
        tokenizer.chat_template = ZEPHYR_CHAT
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
    )  # fmt: skip
    return CausalLM(LlamaForCausalLM(config).eval(), tokenizer, f"smollm2-tokenizer-{request.param}")


PUBLISHED = [  # our template, rank_llm's yaml, use_alpha
    ("first", "rank_zephyr_alpha_template", True),
    ("rank_zephyr", "rank_zephyr_template", False),
    ("rankgpt", "rank_gpt_template", False),
]


@pytest.mark.parametrize(("ours", "theirs", "alpha"), PUBLISHED)
def test_template_files_hold_rank_llm_text(ours: str, theirs: str, alpha: bool) -> None:
    t, ref = listwise_template(ours), template(theirs)
    multi = ref["method"] == "multiturn_listwise"
    assert t.turns == ("multi" if multi else "single")
    assert t.system == ref["system_message"]
    assert t.prefix == ref["prefix_user" if multi else "prefix"]
    assert t.body == ref["body_user" if multi else "body"]
    assert t.suffix == ref["suffix_user" if multi else "suffix"]
    assert t.prefix_assistant == ref.get("prefix_assistant", "")
    assert t.body_assistant == ref.get("body_assistant", "")
    assert t.identifiers == ("alpha" if alpha else "numeric")
    assert "castorini/rank_llm@" in t.source and theirs in t.source


@pytest.mark.parametrize(("ours", "theirs", "alpha"), PUBLISHED)
def test_prompts_equal_rank_llm_string_and_tokens(llm: CausalLM, ours: str, theirs: str, alpha: bool) -> None:
    reference = ListwiseOSLLM(theirs, llm.tokenizer, use_alpha=alpha)
    builder = PromptBuilder(llm, LLMSettings(), ours)
    opener = builder.template.answer_opener
    cut = 0
    for seed, query in enumerate(QUERIES):
        candidates = passages(seed)
        result = reference.result(query, candidates)
        for start, end in [(0, 20), (13, 20)]:  # a full window and a short last one ({num} = 7)
            expected, count = reference.create_prompt(result, start, end)
            prompt = builder.listwise(query, candidates[start:end], single_token=alpha)
            assert prompt.text == expected + opener
            ids = list(prompt.ids)
            assert ids[: len(ids) - len(opener and "x")] == llm.tokenizer.encode(expected)
            if opener:
                assert ids[-1] == llm.tokenizer.convert_tokens_to_ids(opener)
            assert count == len(ids) - (1 if opener else 0) <= 4096 - reference.num_output_tokens(end - start)
            # the shared prefix ends right before the first identifier line; identifiers located in context
            assert (
                llm.tokenizer.decode(list(prompt.prefix)).endswith(
                    "\n" if builder.template.turns == "single" else "user\n"
                )
                or builder.template.turns == "multi"
            )
            if alpha:
                assert prompt.opened_ids == ()
                assert prompt.labels[:3] == ("A", "B", "C")
                assert [llm.tokenizer.decode([i]) for i in prompt.label_ids] == list(prompt.labels)
            cut += prompt.cut
    assert cut >= 3  # the 20-passage windows needed cutting: the fitting loop ran


def test_first_scoring_rule_matches_rank_llm_logits_path(llm: CausalLM) -> None:
    """rank_llm's ``_evaluate_logits`` (its --use_logits path) over a top-30 logprob list built from the same
    forward pass orders the identifiers it sees as our full-vocabulary identifier logits do."""
    reference = ListwiseOSLLM("rank_zephyr_alpha_template", llm.tokenizer, use_alpha=True)
    builder = PromptBuilder(llm, LLMSettings(), "first")
    prompt = builder.listwise(QUERIES[0], passages(0))
    with torch.inference_mode():
        logits = llm.model(input_ids=torch.tensor([list(prompt.ids)])).logits[0, -1].float()
    # bias the identifiers into the top 30 (a random model would not put them there), keeping their order
    biased = logits.clone()
    label_ids = torch.tensor(prompt.label_ids)
    biased[label_ids] += 100.0
    logprobs = torch.log_softmax(biased, dim=-1)
    top = torch.topk(logprobs, 30)
    vllm_list = {
        int(t): _Logit(float(lp), llm.tokenizer.decode([int(t)]))
        for lp, t in zip(top.values, top.indices, strict=True)
    }
    ranked, _ = reference._evaluate_logits(vllm_list, (1, 20))
    ours = order_from_logits(logits[label_ids])
    assert ranked == ">".join(f"[{prompt.labels[i]}]" for i in ours)


class _Logit:
    """vLLM's Logprob as rank_llm reads it."""

    def __init__(self, logprob: float, decoded_token: str) -> None:
        self.logprob = logprob
        self.decoded_token = decoded_token


def test_one_changed_word_breaks_parity(llm: CausalLM) -> None:
    """A template that differs from the source by one word renders a different prompt (the tests above fail)."""
    import dataclasses

    first = listwise_template("first")
    drifted = dataclasses.replace(first, prefix=first.prefix.replace("alphabetical", "numerical"))
    reference = ListwiseOSLLM("rank_zephyr_alpha_template", llm.tokenizer, use_alpha=True)
    expected, _ = reference.create_prompt(reference.result(QUERIES[0], passages(0)), 0, 20)
    assert PromptBuilder(llm, LLMSettings(), "first").listwise(QUERIES[0], passages(0)).text == expected + "["
    assert PromptBuilder(llm, LLMSettings(), drifted).listwise(QUERIES[0], passages(0)).text != expected + "["


def sentencepiece_style_tokenizer():
    """A Llama/Mistral-style tokenizer (Metaspace with a dummy prefix, the whole text one piece, BOS added by
    the post-processor, byte fallback) trained here on a few sentences, with Zephyr's chat template: FIRST's and
    RankZephyr's tokenizers are of this kind (SentencePiece BPE, ``<s>`` prepended by ``encode``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    corpus = (
        [" ".join(WORDS)] * 20 + [q for q in QUERIES] + ["Rank the passages based on their relevance"] * 5
    )
    alphabet = sorted(set("".join(corpus) + "".join(passages(0)) + "[]()<>|/.,:;!?'\"&-\n\u2581"))
    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special + [f"<0x{b:02X}>" for b in range(256)],
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = ZEPHYR_CHAT
    return out


@pytest.mark.parametrize(("ours", "theirs", "alpha"), PUBLISHED[:2])
def test_prompts_equal_rank_llm_with_a_sentencepiece_style_tokenizer(
    ours: str, theirs: str, alpha: bool
) -> None:
    """BOS added as rank_llm's ``tokenizer.encode(prompt)`` adds it; identifiers located in context."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = sentencepiece_style_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
    )  # fmt: skip
    llm = CausalLM(LlamaForCausalLM(config).eval(), tokenizer, "sentencepiece-style")
    reference = ListwiseOSLLM(theirs, tokenizer, use_alpha=alpha)
    builder = PromptBuilder(llm, LLMSettings(), ours)
    opener = builder.template.answer_opener
    for seed, query in enumerate(QUERIES):
        candidates = passages(seed)
        expected, count = reference.create_prompt(reference.result(query, candidates), 0, 20)
        prompt = builder.listwise(query, candidates, single_token=alpha)
        assert prompt.text == expected + opener
        ids = list(prompt.ids)
        assert ids[0] == tokenizer.bos_token_id
        assert ids[: len(ids) - len(opener)] == tokenizer.encode(expected) and count == len(ids) - len(opener)
        if alpha:
            assert [tokenizer.decode([i]) for i in prompt.label_ids] == list(prompt.labels)
            assert prompt.opened_ids == ()  # "[" always split from the letter: FIRST's published rule


def merging_byte_level_tokenizer():
    """A byte-level BPE tokenizer (Qwen's and Llama 3's kind) whose merges turn "[A" .. "[T" except "[O" and "[Q"
    into single tokens, as Qwen2.5's vocabulary does, while "A" .. "T" stay tokens on their own; everything
    else stays bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("[", chr(65 + i)) for i in range(20) if chr(65 + i) not in "OQ"]  # Qwen2.5 splits "[O", "[Q"
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|system|>", "<|user|>", "<|assistant|>", "</s>"])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    out.chat_template = ZEPHYR_CHAT
    return out


def test_first_identifiers_on_a_tokenizer_that_merges_the_bracket() -> None:
    """Where "[A" is one token inside the prompt (Qwen2.5), the identifier read after the closing "[" is the
    bare "A" token, the single-character token rank_llm's logits path reads; the prompt stays rank_llm's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = merging_byte_level_tokenizer()
    assert len(tokenizer.encode("[A]", add_special_tokens=False)) == 2  # "[A" "]": the case under test
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
    )  # fmt: skip
    llm = CausalLM(LlamaForCausalLM(config).eval(), tokenizer, "merging-byte-level")
    reference = ListwiseOSLLM("rank_zephyr_alpha_template", tokenizer, use_alpha=True)
    builder = PromptBuilder(llm, LLMSettings(), "first")
    candidates = passages(0)
    expected, _ = reference.create_prompt(reference.result(QUERIES[0], candidates), 0, 20)
    prompt = builder.listwise(QUERIES[0], candidates)
    assert prompt.text == expected + "["
    assert prompt.labels == tuple(chr(65 + i) for i in range(20))
    assert [tokenizer.decode([i]) for i in prompt.label_ids] == list(prompt.labels)
    assert len(set(prompt.label_ids)) == 20
    from streamrank.rankers.listwise import identifier_logits

    # each identifier scored as the model would write it: "[X" one token, or "[" then "X" (O and Q)
    assert [tokenizer.decode([i]) if i >= 0 else None for i in prompt.opened_ids] == [
        None if label in "OQ" else f"[{label}" for label in prompt.labels
    ]
    values, _ = identifier_logits(llm, prompt, None)  # the FIRST stage's one forward pass reads them
    with torch.inference_mode():
        logits = llm.model(input_ids=torch.tensor([list(prompt.ids)])).logits[0].float()
    before, after = torch.log_softmax(logits[-2], -1), torch.log_softmax(logits[-1], -1)
    opener = prompt.ids[-1]
    expected = [
        before[opened] if opened >= 0 else before[opener] + after[bare]
        for opened, bare in zip(prompt.opened_ids, prompt.label_ids, strict=True)
    ]
    assert torch.allclose(values, torch.stack(expected), atol=1e-4)
