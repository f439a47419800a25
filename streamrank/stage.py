"""The stage contract every retriever and reranker implements (:class:`BaseStage`), and the config
base they share.

A stage takes a batch of rankings (one per query) and returns a batch of rankings. Retrievers fill
an empty ranking from their index; given a ranking that already has candidates (a supplied
candidate list, or an earlier stage's output) they score exactly those candidates instead, so
``dense.toml`` reranks a supplied BM25 top-100. Rerankers always reorder what they are given.

Every hook the pipeline or another stage calls has a default on :class:`BaseStage`: ``run`` (no
default: every stage implements it), ``run_top``, ``children``, ``dependencies``, ``reads_scores_of``,
``build``, ``add``, ``delete``, ``indexed_ids`` and ``close``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from streamrank.errors import ConfigError
from streamrank.types import Document, Ranking

if TYPE_CHECKING:
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

    def names(stage: BaseStage) -> Iterable[str]:
        yield stage.name
        for child in stage.children:
            yield from names(child)

    earlier: list[str] = []
    for stage in stages:
        unknown = [n for n in stage.reads_scores_of() if n not in earlier]
        if unknown:
            raise ConfigError(
                f"{where}: stage {stage.name!r} reads the scores of {unknown}, which no earlier stage is "
                f"named (earlier stages: {earlier or 'none'})"
            )
        earlier.extend(names(stage))
