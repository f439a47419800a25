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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamrank.errors import ConfigError


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
    indexes: list[dict[str, Any]] = []
    """Stages built and kept current with the corpus but never run on a query: the ones another stage
    reads by name (the dense stage a PPR graph links, in a pipeline that does not retrieve with it)."""
    use_for: str = ""
    """What this pipeline is the one to pick for (the README's "Which pipeline?" table)."""
    needs: str = ""
    """What it needs beyond ``make setup`` (``make models``, a training command)."""


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


def resolve_config_path(path: str | Path, near: Path | None = None) -> Path:
    """A path as given, else a bare name looked up in ``near`` (the folder of a file that extends it),
    ``./configs`` and then the packaged configs (``hybrid`` -> configs/hybrid.toml), so a name works
    from a checkout and from an installed wheel."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    folders = [] if candidate.is_absolute() else [*([near] if near else []), Path.cwd() / "configs", CONFIG_DIR]
    for folder in dict.fromkeys(folders):
        for guess in (folder / candidate, folder / f"{candidate}.toml"):
            if guess.is_file():
                return guess
    looked = ", ".join(str(f) for f in dict.fromkeys(folders)) or "nowhere else (an absolute path)"
    raise ConfigError(f"pipeline file {str(path)!r} not found (also looked in {looked})")


def stage_name(options: dict[str, Any]) -> str:
    """The name a stage table gives its stage: ``name``, else its ``kind``."""
    return str(options.get("name") or options.get("kind"))


def nested_stages(options: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage tables inside one stage table (fusion's ``retrievers``, a sharded stage's ``retriever``)."""
    inner = options.get("retrievers", [])
    inner = [*inner, options["retriever"]] if isinstance(options.get("retriever"), dict) else inner
    return [t for t in inner if isinstance(t, dict)]


def all_stage_tables(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stage table of a pipeline, nested ones included, in file order."""
    out: list[dict[str, Any]] = []
    for options in stages:
        out.append(options)
        out.extend(all_stage_tables(nested_stages(options)))
    return out


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` laid over it: tables merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in patch.items():
        old = merged.get(key)
        merged[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def read_raw(path: str | Path, near: Path | None = None, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Path]:
    """One pipeline file as a table, with ``extends`` resolved: the base's keys, the file's own keys over
    them, the file's ``[[stages]]`` appended to the base's, then each ``[override.<stage name>]`` table
    deep-merged into the stage of that name (nested fusion retrievers included). ``[[indexes]]`` are
    inherited and appended the same way."""
    source = resolve_config_path(path, near)
    if source.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, source.resolve()))
        raise ConfigError(f"{source}: `extends` goes round in a circle ({chain})")
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    base_ref = raw.pop("extends", None)
    overrides = raw.pop("override", {})
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise ConfigError(f"{source}: `extends` names one pipeline file (a string), got {base_ref!r}")
        base, _ = read_raw(base_ref, source.parent, (*seen, source.resolve()))
        own = {part: raw.pop(part, []) for part in ("indexes", "stages")}
        raw = {**base, **raw, **{part: [*base.get(part, []), *own[part]] for part in own}}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"{source}: `override` holds one table per stage name ([override.dense] ...)")
    for part in ("indexes", "stages"):
        if isinstance(raw.get(part), list):
            raw[part] = [_apply_overrides(t, overrides) for t in raw[part]]
    tables = all_stage_tables([*raw.get("indexes", []), *raw.get("stages", [])])
    unknown = sorted(set(overrides) - {stage_name(t) for t in tables})
    if unknown:
        known = ", ".join(stage_name(t) for t in tables)
        raise ConfigError(f"{source}: [override.{unknown[0]}] names no stage of this pipeline (stages: {known})")
    return raw, source


def _apply_overrides(options: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    if not isinstance(options, dict):
        return options
    merged = deep_merge(options, overrides.get(stage_name(options), {}))
    if isinstance(merged.get("retrievers"), list):
        merged["retrievers"] = [_apply_overrides(t, overrides) for t in merged["retrievers"]]
    if isinstance(merged.get("retriever"), dict):
        merged["retriever"] = _apply_overrides(merged["retriever"], overrides)
    return merged


def read_config(path: str | Path) -> tuple[PipelineConfig, Path]:
    """A pipeline file, ``extends`` resolved, validated (nothing is built or loaded)."""
    raw, source = read_raw(path)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(source))) from None
    if not config.stages:
        raise ConfigError(f"{source}: a pipeline needs at least one [[stages]] entry")
    return config, source


def default_index_dir(corpus: str | None) -> Path | None:
    """$STREAMRANK_HOME/indexes/<corpus id>, or None for a pipeline without a corpus."""
    if corpus is None:
        return None
    from streamrank.datasets import corpus_key
    from streamrank.models import cache_home

    return cache_home() / "indexes" / corpus_key(corpus)
