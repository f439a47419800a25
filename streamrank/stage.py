"""The stage contract every retriever and reranker implements (:class:`BaseStage`), and the config
base they share.

A stage takes a batch of rankings (one per query) and returns a batch of rankings. Retrievers fill
an empty ranking from their index; given a ranking that already has candidates (a supplied
candidate list, or an earlier stage's output) they score exactly those candidates instead, so
``dense.toml`` reranks a supplied BM25 top-100. Rerankers always reorder what they are given.

Every hook the pipeline or another stage calls has a default on :class:`BaseStage`: ``run`` (no
default: every stage implements it), ``run_top``, ``children``, ``dependencies``, ``reads_scores_of``,
``references``, ``bind``, ``build``, ``add``, ``delete``, ``indexed_ids`` and ``close``.

Stages meet by name only: a stage that reads another stage's index names it in its config
(``vectors_from = "dense"``), lists it in ``references`` and receives it in ``bind`` when the
pipeline is loaded (:func:`bind_references`), which raises a ConfigError naming both stages when the
named stage is missing or cannot serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from streamrank.errors import ConfigError
from streamrank.types import Document, Ranking

if TYPE_CHECKING:
    import numpy as np

    from streamrank.context import PipelineContext


class StageConfig(BaseModel):
    """Options every stage accepts. Subclasses add their own; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: str
    name: str | None = None
    k: int = 100
    """How many candidates this stage passes on."""


class BaseStage:
    """The base of every stage: holds the parsed config and the pipeline context.

    Stages that keep an index override ``build`` (create it from the corpus), ``add`` and
    ``delete`` (keep it current without a rebuild) and ``indexed_ids``. The defaults do nothing,
    which is right for stages without state.
    """

    Config: ClassVar[type[StageConfig]] = StageConfig
    shardable: ClassVar[bool] = False
    """Whether a pipeline with ``shards = N`` splits this stage's index into N shards (retrievers with an index)."""

    def __init__(self, config: StageConfig, context: PipelineContext) -> None:
        self.config = config
        self.context = context
        self.name: str = config.name or config.kind

    @classmethod
    def from_dict(cls, options: dict[str, Any], context: PipelineContext) -> BaseStage:
        return cls(cls.Config.model_validate(options), context)

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """Batch of rankings in (one per query), batch of rankings out, in the same order."""
        raise NotImplementedError

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        """``run`` when only the best ``k`` of the output will be used (the pipeline's last stage).

        Stages that can do less work for that override it (retrievers search only ``k`` deep);
        the result's top ``k`` must equal the top ``k`` of ``run``, except where a stage documents a
        configured approximation (fusion's ``serve_depth``).
        """
        return self.run(rankings)

    @property
    def children(self) -> Sequence[BaseStage]:
        """Stages this one runs itself (fusion's retrievers); the pipeline builds, updates and closes
        them after it."""
        return ()

    def dependencies(self) -> Sequence[BaseStage]:
        """Stages whose indexes this one reads; the pipeline builds, updates and closes them before it."""
        return ()

    def reads_scores_of(self) -> Sequence[str]:
        """Names of earlier stages whose ``stage_scores`` this one reads (checked when the pipeline is
        built: :func:`check_score_references`)."""
        return ()

    def references(self) -> Mapping[str, str]:
        """Config keys of this stage that name another stage of the pipeline -> the name given
        (``{"vectors_from": "dense"}``); each is resolved and passed to :meth:`bind` at load time."""
        return {}

    def bind(self, key: str, stage: BaseStage) -> None:
        """Receive the stage that config key ``key`` names; raise ConfigError (naming both stages) when
        it cannot serve this one. Called once per key in :meth:`references`, before any run."""
        raise ConfigError(f"stage {self.name!r} takes no stage reference {key!r}")

    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        """Create this stage's index over ``documents`` (no-op for stateless stages)."""

    def add(self, documents: Sequence[Document]) -> None:
        """Add or replace documents in this stage's index (no-op for stateless stages)."""

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Remove documents from this stage's index (no-op for stateless stages)."""

    def indexed_ids(self) -> list[str] | None:
        """Ids of every document in this stage's index, for ``Pipeline.recover`` to compare with the
        store; None (the default) for stages that keep no index of the corpus."""
        return None

    def close(self) -> None:
        """Release files and models."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_unique_names(stages: Iterable[BaseStage], where: str, what: str = "stage") -> None:
    """Raise ConfigError naming the duplicates unless every stage in ``stages`` has its own name."""
    names = [stage.name for stage in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: {what} names must be unique; set `name` to tell apart {duplicates}")


def check_score_references(stages: Sequence[BaseStage], where: str) -> None:
    """Raise ConfigError unless every stage's ``reads_scores_of`` names a stage (or a child of one) before it."""

    earlier: list[str] = []
    for stage in stages:
        unknown = [n for n in stage.reads_scores_of() if n not in earlier]
        if unknown:
            raise ConfigError(
                f"{where}: stage {stage.name!r} reads the scores of {unknown}, which no earlier stage is "
                f"named (earlier stages: {earlier or 'none'})"
            )
        earlier.extend(s.name for s in stage_tree([stage]))


@runtime_checkable
class VectorSource(Protocol):
    """A stage whose index stores one vector per document that other stages may reuse (dense)."""

    name: str

    def vector_settings(self) -> dict[str, Any]:
        """What the stored vectors depend on (model, dtype, prompts, low-rank settings...)."""
        ...

    def embeddings_for(self, doc_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``doc_ids``, in that order."""
        ...


def require_vector_source(referrer: BaseStage, key: str, stage: BaseStage, wanted: Mapping[str, Any]) -> VectorSource:
    """``stage`` as a VectorSource whose settings equal ``wanted`` on every key of it; a ConfigError naming
    both stages and each setting that differs otherwise."""
    if not isinstance(stage, VectorSource):
        raise ConfigError(
            f"stage {referrer.name!r}: {key} = {stage.name!r} names a {type(stage).__name__}, which stores no "
            "document vectors (name a dense stage)"
        )
    have = stage.vector_settings()
    differ = [f"{k}: {referrer.name!r} needs {v!r}, {stage.name!r} has {have.get(k)!r}" for k, v in wanted.items()
              if have.get(k) != v]
    if differ:
        raise ConfigError(
            f"stage {referrer.name!r}: {key} = {stage.name!r}, but their vectors would differ ("
            + "; ".join(differ) + "): make the settings match or name another stage"
        )
    return stage


def stage_tree(stages: Iterable[BaseStage]) -> Iterable[BaseStage]:
    """Every stage, each followed by the stages it runs itself (fusion's retrievers)."""
    for stage in stages:
        yield stage
        yield from stage_tree(stage.children)


def bind_references(stages: Sequence[BaseStage], where: str) -> None:
    """Resolve every stage's :meth:`~BaseStage.references` by name among ``stages`` and their children, and
    :meth:`~BaseStage.bind` them; a ConfigError naming the referrer and the name when none matches."""
    every = list(stage_tree(stages))
    by_name = {stage.name: stage for stage in every}
    for stage in every:
        for key, target in stage.references().items():
            found = by_name.get(target)
            if sum(s.name == target for s in every) > 1:
                raise ConfigError(
                    f"{where}: stage {stage.name!r}: {key} = {target!r} names more than one stage; set `name` to "
                    "tell them apart"
                )
            if found is None or found is stage:
                known = ", ".join(n for n in by_name if n != stage.name) or "none"
                raise ConfigError(
                    f"{where}: stage {stage.name!r}: {key} = {target!r} names no other stage of this pipeline "
                    f"(stages: {known})"
                )
            try:
                stage.bind(key, found)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
