"""The composition root: stage kinds mapped to their classes (imported only when used), and pipelines
built from their files. It sits above the stages (index/, rankers/) and below the front ends, so core
never names a stage module and stages build the tables they hold through ``context.build_stage``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from streamrank.config import default_index_dir, describe_validation_error, read_config
from streamrank.context import PipelineContext
from streamrank.errors import ConfigError
from streamrank.pipeline import Pipeline
from streamrank.stage import BaseStage, bind_references, check_score_references, check_unique_names

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


def validate_stage(options: dict[str, Any], where: str) -> tuple[type[BaseStage], Any]:
    """The stage class and its validated config for one TOML table (nothing is built or loaded)."""
    kind = options.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: every stage needs a `kind` (a string)")
    cls = stage_class(kind, where)
    try:
        return cls, cls.Config.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"{where} ({kind})")) from None


def build_stage(options: dict[str, Any], context: PipelineContext, where: str) -> BaseStage:
    """Instantiate one stage from its TOML table, with errors that say which table was wrong.

    In a pipeline with ``shards = N`` (N > 1), a stage whose class is ``shardable`` is built as a
    ``sharded`` stage over N copies of it, under the same name.
    """
    if context.factory is None:
        context.factory = FACTORY
    cls, config = validate_stage(options, where)
    if context.shards > 1 and cls.shardable:
        sharded = {"kind": "sharded", "name": config.name or config.kind, "shards": context.shards, "retriever": options}
        cls, config = validate_stage(sharded, where)
    return cls(config, context)


def load_pipeline(
    path: str | Path,
    *,
    corpus: str | None = None,
    index_dir: str | Path | None = None,
    device: str | None = None,
) -> Pipeline:
    """Read a pipeline file and build its stages. ``corpus``/``index_dir`` override the file's values.

    ``corpus=""`` means no corpus at all (the pipeline only reranks supplied candidates).
    """
    config, source = read_config(path)
    corpus_ref = (corpus if corpus is not None else config.corpus) or None
    chosen_dir = index_dir if index_dir is not None else config.index_dir
    resolved_dir = Path(chosen_dir).expanduser() if chosen_dir else default_index_dir(corpus_ref)
    context = PipelineContext(
        resolved_dir, corpus=corpus_ref, device=device or config.device, shards=config.shards, factory=FACTORY
    )
    indexes = [build_stage(opts, context, f"{source}: indexes[{i}]") for i, opts in enumerate(config.indexes)]
    stages = [build_stage(opts, context, f"{source}: stages[{i}]") for i, opts in enumerate(config.stages)]
    check_unique_names([*indexes, *stages], str(source))
    check_score_references(stages, str(source))
    bind_references([*indexes, *stages], str(source))
    return Pipeline(config.name, stages, context, source=source, description=config.description, indexes=indexes)


def build_in(pipeline: Pipeline, options: dict[str, Any], where: str) -> BaseStage:
    """A stage built from ``options`` in ``pipeline``'s context, its stage references bound to the
    pipeline's stages (tuning builds one such stage per grid point in place of the stage it tunes)."""
    stage = build_stage(options, pipeline.context, where)
    others = [s for s in (*pipeline.indexes, *pipeline.stages) if s.name != stage.name]
    bind_references([*others, stage], where)
    return stage


class _Factory:
    """The :class:`~streamrank.context.StageFactory` every context built here gets."""

    def build(self, options: dict[str, Any], context: PipelineContext, where: str) -> BaseStage:
        return build_stage(options, context, where)

    def validate(self, options: dict[str, Any], where: str) -> tuple[type[BaseStage], Any]:
        return validate_stage(options, where)


FACTORY = _Factory()
