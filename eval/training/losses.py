"""Losses of the one-pass reranker recipes (written for this toolkit after the FIRST and E2Rank papers).

- :func:`weighted_ranknet`: FIRST's rank-weighted pairwise loss. For every pair of passages (i, j)
  with i before j in the target order, ``log(1 + exp(-(s_i - s_j)))`` weighted by
  ``1 / (rank_i + rank_j)`` (1-based ranks), so mistakes near the top cost most; averaged over pairs.
- :func:`first_token_loss`: FIRST's objective on one answer position: cross-entropy of the best
  passage's identifier over the full vocabulary (the first token of the target answer) plus
  ``RANKNET_WEIGHT`` x the weighted RankNet over the identifier logits.
- :func:`in_batch_contrastive`: InfoNCE of each query against every candidate of the batch, its own
  positive the target (E2Rank's first stage, the usual dense-retrieval loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RANKNET_WEIGHT = 10.0
"""FIRST's weight of the weighted RankNet term next to the language-modelling loss."""
CONTRASTIVE_SCALE = 20.0
"""Cosines are multiplied by this (temperature 0.05) before a softmax, as sentence-transformers does."""


def weighted_ranknet(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Rank-weighted RankNet of ``scores`` (one per passage) against target ``ranks`` (0 = best)."""
    import torch
    import torch.nn.functional as F

    ranks = ranks.to(scores.device)
    before = ranks[:, None] < ranks[None, :]  # pair (i, j): i should score above j
    if not bool(before.any()):
        return scores.sum() * 0.0
    weight = 1.0 / ((ranks[:, None] + 1) + (ranks[None, :] + 1)).to(scores.dtype)
    diff = scores[:, None] - scores[None, :]
    losses = F.softplus(-diff)[before] * weight[before]
    return losses.sum() / torch.count_nonzero(before)


def first_token_loss(
    vocab_logits: torch.Tensor, label_ids: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the best identifier, weighted RankNet over the identifier logits) for one prompt.

    ``vocab_logits``: the answer position's logits over the vocabulary; ``label_ids``: the identifier
    token of each passage in prompt order; ``ranks``: each passage's target rank (0 = best).
    """
    import torch.nn.functional as F

    label_ids = label_ids.to(vocab_logits.device)
    best = label_ids[int(ranks.argmin())]
    ce = F.cross_entropy(vocab_logits.float()[None], best[None])
    return ce, weighted_ranknet(vocab_logits.float()[label_ids], ranks)


def in_batch_contrastive(
    queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """InfoNCE: row i of ``queries`` against every row of ``candidates``; ``positives[i]`` is its target."""
    import torch.nn.functional as F

    return F.cross_entropy(CONTRASTIVE_SCALE * queries @ candidates.T, positives.to(queries.device))
