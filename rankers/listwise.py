"""Single-token listwise reranking (FIRST, Reddy et al. 2024) and the sliding-window driver.

The prompt (see :mod:`streamrank.rankers.prompts`) ends with the assistant's opening "[", so ONE
forward pass gives, at the next-token position, a logit for every passage identifier; sorting the
identifiers by logit gives the whole order of the window. Logits are read from the full vocabulary;
constant logits or a missing/non-finite identifier raise RankerError instead of returning an
arbitrary order.

Windows: ``mode = "sliding"`` reranks windows of ``window`` passages moving up from the bottom of
the list by ``stride`` (RankGPT's schedule; the last window always starts at the top), ``mode =
"full"`` ranks the whole list in one pass (passages are cut uniformly if needed to fit the context).
The instruction + query prefix is computed once per query and reused by every window
(``prefix_cache``), streamed through one cache that is cropped back after each window.

The prompt is the stage's ``template`` (:mod:`streamrank.rankers.prompts`); FIRST's default is ``first``,
rank_llm's ``rank_zephyr_alpha`` template that FIRST's checkpoints were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from streamrank.errors import RankerError
from streamrank.rankers.llm import LLMReranker, LLMRerankerConfig
from streamrank.rankers.prompts import ListwisePrompt
from streamrank.stage import StageConfig
from streamrank.types import Ranking

if TYPE_CHECKING:
    import torch

    from streamrank.rankers.causal_lm import CausalLM
    from streamrank.rankers.kv import PrefixCache

CONSTANT_TOLERANCE = 1e-6


class ListwiseConfig(LLMRerankerConfig):
    mode: Literal["sliding", "full"] = "sliding"
    window: int = Field(20, ge=2)
    stride: int | None = Field(None, ge=1)
    """Default: half the window (20/10 as in RankGPT)."""
    prefix_cache: bool = True
    """Compute the instruction + query once per query and reuse its KV cache for every window."""

    @model_validator(mode="after")
    def _stride_below_window(self) -> ListwiseConfig:
        if self.stride is None:
            self.stride = max(self.window // 2, 1)
        if self.stride > self.window:
            raise ValueError(
                f"stride ({self.stride}) must not exceed window ({self.window}): passages would be skipped"
            )
        return self


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows [start, end) from the bottom of a list of ``n`` up; the last starts at 0."""
    if n <= window:
        return [(0, n)] if n else []
    spans = []
    end = n
    while True:
        start = max(end - window, 0)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= stride


def order_scores(order: Sequence[int]) -> list[float]:
    """Scores from a permutation (``order[r]`` = index ranked r-th): best gets ``len(order)``."""
    scores = [0.0] * len(order)
    for rank, index in enumerate(order):
        scores[index] = float(len(order) - rank)
    return scores


def order_from_logits(values: torch.Tensor, what: str = "identifier logits") -> list[int]:
    """Indices sorted by descending logit (stable); RankerError when constant or not finite."""
    import torch

    if values.ndim != 1 or values.numel() == 0:
        raise RankerError(f"{what}: expected one non-empty row, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise RankerError(f"{what}: non-finite values {values.tolist()}")
    if len(values) > 1 and float(values.max() - values.min()) <= CONSTANT_TOLERANCE:
        raise RankerError(
            f"{what} are constant ({float(values[0]):.4g}): the model cannot tell the passages apart "
            "(wrong answer position, template cut, or an unsuitable model)"
        )
    return sorted(range(len(values)), key=lambda i: -float(values[i]))


def identifier_logits(
    llm: CausalLM, prompt: ListwisePrompt, prefix: PrefixCache | None
) -> tuple[torch.Tensor, Any]:
    """Scores of the prompt's identifiers from one forward pass: their logits at the answer position, or
    (where the tokenizer merges the opener with identifiers) :func:`opened_identifier_scores`."""
    for label, label_id in zip(prompt.labels, prompt.label_ids, strict=True):
        if label_id < 0:  # the prompt builder located each identifier (in context or as a bare token)
            raise RankerError(f"identifier [{label}] has no single token in this prompt")
    if prefix is not None and prefix.ids != list(prompt.prefix):
        prefix = None  # this prompt's prefix differs from the cached one: compute it whole
    sequence = list(prompt.body if prefix is not None else prompt.ids)
    if not prompt.opened_ids:
        values, result = llm.next_token_logits([sequence], prompt.label_ids, prefix=prefix)
        return values[0], result
    return opened_identifier_scores(llm, prompt, sequence, prefix)


def opened_identifier_scores(
    llm: CausalLM, prompt: ListwisePrompt, sequence: list[int], prefix: PrefixCache | None
) -> tuple[torch.Tensor, Any]:
    """Log-probability of each identifier written with its opener, under the model's own tokenization.

    On a vocabulary that merges the opener with an identifier ("[A" one token, as byte-level BPE does for
    most letters), the prompt's closing "[" is a context the model never saw before those letters; it would
    write "[A" as one token. So, from the same forward pass: log p("[A") at the position before the opener
    where the pair is one token, log p("[") + log p("A" | "[") where the tokenizer splits it."""
    import torch

    result = llm.logits_at([sequence], [[len(sequence) - 2, len(sequence) - 1]], prefix=prefix)
    before, after = (torch.log_softmax(row.float(), dim=-1).cpu() for row in result.rows[0])
    opener_id = sequence[-1]
    scores = [
        before[opened] if opened >= 0 else before[opener_id] + after[bare]
        for opened, bare in zip(prompt.opened_ids, prompt.label_ids, strict=True)
    ]
    values = torch.stack(scores)
    if not torch.isfinite(values).all():
        raise RankerError(f"{llm.name}: non-finite identifier scores")
    return values, result


class ListwiseReranker(LLMReranker):
    """Sliding-window / full-list driver; subclasses order one window in :meth:`rank_window`."""

    Config: ClassVar[type[StageConfig]] = ListwiseConfig
    config: ListwiseConfig
    answer_reserve: ClassVar[int] = 0
    """Tokens kept free per identifier for the answer (generation)."""
    single_token_labels: ClassVar[bool] = True
    """Whether every identifier must be one token in the prompt (its logit is read)."""

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        return order_scores(self.rank_texts(ranking, ranking.query.text, texts))

    def spans(self, n: int) -> list[tuple[int, int]]:
        if self.config.mode == "full":
            return [(0, n)]
        return window_spans(n, self.config.window, self.config.stride or self.config.window)

    def window_prompt(self, query: str, passages: Sequence[str]) -> ListwisePrompt:
        """The prompt this stage scores for one window (training builds its examples with it too)."""
        fit = self.config.mode == "full"
        return self.builder.listwise(
            query,
            passages,
            reserve=self.answer_reserve * len(passages),
            fit=fit,
            single_token=self.single_token_labels,
        )

    def rank_texts(self, ranking: Ranking, query: str, texts: Sequence[str]) -> list[int]:
        """A permutation of ``texts`` (best first), ranking windows bottom-up."""
        order = list(range(len(texts)))
        spans = self.spans(len(texts))
        if len(texts) < 2:
            return order
        prefix: PrefixCache | None = None
        for start, end in spans:
            window = order[start:end]
            prompt = self.window_prompt(query, [texts[i] for i in window])
            if prompt.cut:
                unit = "words" if self.builder.template.passages == "words" else "tokens"
                ranking.notes.append(
                    f"{self.name}: passages cut to {prompt.passage_tokens} {unit} to fit {len(window)} in the context"
                )
            if self.config.prefix_cache and (prefix is None or prefix.ids != list(prompt.prefix)):
                prefix = self.listwise_prefix(ranking, prompt.prefix)  # once per query (again if {num} changes)
            permutation = self.rank_window(ranking, prompt, prefix, (start, end))
            order[start:end] = [window[p] for p in permutation]
        return order

    def rank_window(
        self, ranking: Ranking, prompt: ListwisePrompt, prefix: PrefixCache | None, span: tuple[int, int]
    ) -> list[int]:
        raise NotImplementedError


class SingleTokenListwise(ListwiseReranker):
    """FIRST: the identifier logits of the first answer token order the window in one pass."""

    default_template: ClassVar[str] = "first"

    def rank_window(
        self, ranking: Ranking, prompt: ListwisePrompt, prefix: PrefixCache | None, span: tuple[int, int]
    ) -> list[int]:
        values, result = identifier_logits(self.llm, prompt, prefix)
        order = order_from_logits(values, f"{self.name}: identifier logits for window {span[0]}-{span[1]}")
        self.record_call(
            ranking,
            self.llm.name,
            prompt_tokens=result.computed_tokens,
            seconds=result.seconds,
            note=f"window {span[0]}-{span[1]}: {len(prompt.labels)} passages, prompt {len(prompt.ids)} tokens"
            + (f", prefix {prefix.length} reused" if prefix is not None else ""),
        )
        return order
