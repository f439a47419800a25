"""Pipeline definitions: a TOML file naming a corpus and an ordered list of stages.

    name = "hybrid"
    corpus = "scifact"              # dataset name or folder; what `streamrank index` indexes
    # index_dir = "/path/to/index"  # default: $STREAMRANK_HOME/indexes/<corpus>

    [[stages]]
    kind = "fusion"
    method = "rrf"
      [[stages.retrievers]]
      kind = "bm25"
      [[stages.retrievers]]
      kind = "dense"

Every key is checked: an unknown key or stage kind is a ConfigError that names it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamrank.errors import ConfigError
from streamrank.registry import stage_class

if TYPE_CHECKING:
    from streamrank.context import PipelineContext
    from streamrank.pipeline import Pipeline
    from streamrank.stage import BaseStage



def packaged_config_dir() -> Path:
    """The example pipelines shipped inside the package (``configs/`` of a checkout, the same files in a wheel)."""
    from importlib.resources import files

    return Path(str(files("streamrank.configs")))


CONFIG_DIR = packaged_config_dir()


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    corpus: str | None = None
    index_dir: str | None = None
    device: str | None = None
    shards: int = Field(1, ge=1)
    """Split the corpus into this many shards by a stable hash of the document id: every retriever
    with an index (BM25, dense...) gets one index per shard, searched by scatter-gather."""
    stages: list[dict[str, Any]]


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """Turn a pydantic error into one line per problem, each naming the offending key."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {key!r}")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required key {key!r}")
        else:
            lines.append(f"{where}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a bare name looked up in ``./configs`` and then in the packaged configs
    (``hybrid`` -> configs/hybrid.toml), so a name works from a checkout and from an installed wheel."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    folders = [Path.cwd() / "configs", CONFIG_DIR] if not candidate.is_absolute() else []
    for folder in dict.fromkeys(folders):
        for guess in (folder / candidate, folder / f"{candidate}.toml"):
            if guess.is_file():
                return guess
    looked = ", ".join(str(f) for f in dict.fromkeys(folders)) or "nowhere else (an absolute path)"
    raise ConfigError(f"pipeline file {str(path)!r} not found (also looked in {looked})")


def read_config(path: str | Path) -> tuple[PipelineConfig, Path]:
    source = resolve_config_path(path)
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(source))) from None
    if not config.stages:
        raise ConfigError(f"{source}: a pipeline needs at least one [[stages]] entry")
    return config, source


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
    from streamrank.context import PipelineContext
    from streamrank.pipeline import Pipeline
    from streamrank.stage import check_score_references, check_unique_names

    config, source = read_config(path)
    corpus_ref = (corpus if corpus is not None else config.corpus) or None
    chosen_dir = index_dir if index_dir is not None else config.index_dir
    resolved_dir = Path(chosen_dir).expanduser() if chosen_dir else default_index_dir(corpus_ref)
    context = PipelineContext(resolved_dir, corpus=corpus_ref, device=device or config.device, shards=config.shards)
    stages = [build_stage(opts, context, f"{source}: stages[{i}]") for i, opts in enumerate(config.stages)]
    check_unique_names(stages, str(source))
    check_score_references(stages, str(source))
    return Pipeline(config.name, stages, context, source=source, description=config.description)


def default_index_dir(corpus: str | None) -> Path | None:
    """$STREAMRANK_HOME/indexes/<corpus id>, or None for a pipeline without a corpus."""
    if corpus is None:
        return None
    from streamrank.datasets import corpus_key
    from streamrank.models import cache_home

    return cache_home() / "indexes" / corpus_key(corpus)
