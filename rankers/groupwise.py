"""Groupwise reranking (GroupRank-style): a group of candidates scored jointly in one pass.

Each group is one listwise prompt (query + G passages labelled [A], [B], ...); one forward pass gives
every member a score: its identifier's logit at the answer position. Groups stream through one KV
cache that holds the query's instruction + query prefix: each group is computed after the prefix,
scored, then evicted (cropped), so memory is prefix + one group however long the list.

Calibration (``calibration``), so that scores of different groups can be merged:

- ``"anchor"`` (default): the first stage's top ``anchors`` candidates are put, at the same positions
  ([A], [B], ...), into EVERY group, which is filled up with G - anchors other candidates in
  first-stage order. A member's score is its logit minus the mean logit of the anchors in its group;
  an anchor's score is the mean of its shifted logit over all groups. Scores are thus log-odds
  against the same reference documents in every group; any per-group offset (which is all a
  softmax over the group would change) cancels.
- ``"none"``: plain per-group scores, the baseline: consecutive groups of G candidates, each member
  scored by its log-softmax over its own group's identifiers, merged as they are.

A list that fits one group is scored in one pass (log-softmax), with no anchors either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from streamrank.rankers.listwise import identifier_logits, order_from_logits
from streamrank.rankers.llm import LLMReranker, LLMRerankerConfig
from streamrank.rankers.prompts import ListwisePrompt
from streamrank.stage import StageConfig
from streamrank.types import Ranking

if TYPE_CHECKING:
    import torch

    from streamrank.rankers.kv import PrefixCache


class GroupwiseConfig(LLMRerankerConfig):
    group_size: int = Field(10, ge=2)
    """Passages per prompt, anchors included."""
    anchors: int = Field(2, ge=0)
    calibration: Literal["anchor", "none"] = "anchor"
    prefix_cache: bool = True

    @model_validator(mode="after")
    def _anchors_fit(self) -> GroupwiseConfig:
        if self.calibration == "anchor" and not 1 <= self.anchors < self.group_size:
            raise ValueError(f"calibration 'anchor' needs 1 <= anchors < group_size ({self.group_size})")
        return self


@dataclass(frozen=True)
class GroupPlan:
    """Which candidates (indices into the list) go into which group; ``anchors`` lead every group."""

    anchors: list[int]
    groups: list[list[int]]


@dataclass
class StreamStats:
    """What the last ranking cost: groups scored and the largest KV cache held."""

    groups: int = 0
    peak_kv_bytes: int = 0
    prompt_tokens: list[int] = field(default_factory=list)


def plan_groups(n: int, group_size: int, anchors: int, calibration: str) -> GroupPlan:
    """Split ``n`` candidates (first-stage order) into groups; see the module docstring."""
    if n <= group_size or calibration == "none":
        return GroupPlan([], [list(range(s, min(s + group_size, n))) for s in range(0, n, group_size)])
    lead = list(range(anchors))
    step = group_size - anchors
    return GroupPlan(lead, [lead + list(range(s, min(s + step, n))) for s in range(anchors, n, step)])


def merge_group_scores(n: int, plan: GroupPlan, group_logits: Sequence[torch.Tensor]) -> list[float]:
    """One comparable score per candidate from each group's identifier logits (module docstring)."""
    import torch

    scores = [0.0] * n
    if not plan.anchors:
        for group, logits in zip(plan.groups, group_logits, strict=True):
            for member, value in zip(group, torch.log_softmax(logits.double(), dim=0).tolist(), strict=True):
                scores[member] = value
        return scores
    k = len(plan.anchors)
    anchor_sums = [0.0] * k
    for group, logits in zip(plan.groups, group_logits, strict=True):
        shifted = (logits.double() - logits[:k].double().mean()).tolist()
        for j in range(k):
            anchor_sums[j] += shifted[j]
        for member, value in zip(group[k:], shifted[k:], strict=True):
            scores[member] = value
    for j, anchor in enumerate(plan.anchors):
        scores[anchor] = anchor_sums[j] / len(plan.groups)
    return scores


class GroupwiseReranker(LLMReranker):
    """Scores groups of candidates jointly, streaming them through the query's prefix cache."""

    Config: ClassVar[type[StageConfig]] = GroupwiseConfig
    config: GroupwiseConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_stats = StreamStats()

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        return self.score_texts(ranking, ranking.query.text, texts)

    def group_prompt(self, query: str, passages: Sequence[str]) -> ListwisePrompt:
        """The prompt this stage scores for one group (training builds its examples with it too)."""
        return self.builder.listwise(query, passages)

    def score_texts(self, ranking: Ranking, query: str, texts: Sequence[str]) -> list[float]:
        """Calibrated scores parallel to ``texts``; model calls recorded on ``ranking``."""
        cfg = self.config
        plan = plan_groups(len(texts), cfg.group_size, cfg.anchors, cfg.calibration)
        prefix: PrefixCache | None = None
        stats = StreamStats()
        logits = []
        for number, group in enumerate(plan.groups):
            prompt = self.group_prompt(query, [texts[i] for i in group])
            if cfg.prefix_cache and (prefix is None or prefix.ids != list(prompt.prefix)):
                prefix = self.listwise_prefix(ranking, prompt.prefix)
            values, result = identifier_logits(self.llm, prompt, prefix)
            order_from_logits(
                values, f"{self.name}: identifier logits of group {number}"
            )  # raises if unusable
            logits.append(values)
            stats.prompt_tokens.append(result.computed_tokens)
            self.record_call(
                ranking,
                self.llm.name,
                prompt_tokens=result.computed_tokens,
                seconds=result.seconds,
                note=f"group {number}: {len(group)} passages ({len(plan.anchors)} anchors)",
            )
        stats.groups = len(plan.groups)
        stats.peak_kv_bytes = prefix.peak_bytes if prefix is not None else 0
        self.last_stats = stats
        return merge_group_scores(len(texts), plan, logits)
