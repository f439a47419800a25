"""Stage kinds a pipeline TOML may name, mapped to their classes (imported only when used)."""

from __future__ import annotations

import importlib
from typing import Any

from streamrank.errors import ConfigError

STAGE_KINDS: dict[str, str] = {
    # first stages (index/)
    "bm25": "streamrank.index.bm25:BM25Retriever",
    "dense": "streamrank.index.dense:DenseRetriever",
    "fusion": "streamrank.index.fusion:FusionStage",
    "score_fusion": "streamrank.index.fusion:ScoreFusionStage",
    "ppr": "streamrank.index.ppr:PPRStage",
    "splade": "streamrank.index.splade:SpladeRetriever",
    "sharded": "streamrank.index.sharded_stage:ShardedRetriever",
    # rerankers (rankers/)
    "first": "streamrank.rankers.listwise:SingleTokenListwise",
    "generative_listwise": "streamrank.rankers.generative:GenerativeListwise",
    "groupwise": "streamrank.rankers.groupwise:GroupwiseReranker",
    "e2rank": "streamrank.rankers.e2rank:EmbeddingListwise",
    "qlm": "streamrank.rankers.pointwise:QueryLikelihood",
    "yes_no": "streamrank.rankers.pointwise:YesNoReranker",
    "e2rank_decoder": "streamrank.rankers.decoder_embedder:DecoderE2Rank",
    "cross_encoder": "streamrank.rankers.cross_encoder:CrossEncoderReranker",
    "learned": "streamrank.rankers.learned:LearnedRanker",
}


def stage_class(kind: str, where: str = "stages"):
    """The class for ``kind``; a ConfigError naming the kind and the known ones otherwise."""
    target = STAGE_KINDS.get(kind)
    if target is None:
        known = ", ".join(sorted(STAGE_KINDS))
        raise ConfigError(f"{where}: unknown stage kind {kind!r} (known kinds: {known})")
    return import_target(target, f"{where}: stage kind {kind!r}", ConfigError)


def import_target(target: str, what: str, error: type[Exception]) -> Any:
    """Import ``"package.module:attr"``; a missing optional module becomes ``error`` naming ``what``."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise error(f"{what} is not available in this build ({exc})") from exc
        raise
    return getattr(module, attr)
