"""The Stage protocol every retriever and reranker implements, and the config base they share.

A stage takes a batch of rankings (one per query) and returns a batch of rankings. Retrievers
(``is_retriever = True``) fill an empty ranking from their index; given a ranking that already has
candidates (a supplied candidate list, or an earlier stage's output) they score exactly those
candidates instead, so ``dense.toml`` reranks a supplied BM25 top-100. Rerankers always reorder
what they are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

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


@runtime_checkable
class Stage(Protocol):
    """Batch of rankings in, batch of rankings out."""

    name: str
    is_retriever: bool

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]: ...


class BaseStage:
    """Convenience base: holds the parsed config and the pipeline context.

    Stages that keep an index override ``build`` (create it from the corpus), ``add`` and
    ``delete`` (keep it current without a rebuild). The defaults do nothing, which is right for
    stages without state.
    """

    Config: ClassVar[type[StageConfig]] = StageConfig
    is_retriever: ClassVar[bool] = False

    def __init__(self, config: StageConfig, context: PipelineContext) -> None:
        self.config = config
        self.context = context
        self.name: str = config.name or config.kind

    @classmethod
    def from_dict(cls, options: dict[str, Any], context: PipelineContext) -> BaseStage:
        return cls(cls.Config.model_validate(options), context)

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        raise NotImplementedError

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        """``run`` when only the best ``k`` of the output will be used (the pipeline's last stage).

        Stages that can do less work for that override it (retrievers search only ``k`` deep);
        the result's top ``k`` must equal the top ``k`` of ``run``.
        """
        return self.run(rankings)

    def dependencies(self) -> Sequence[BaseStage]:
        """Stages whose indexes this one reads; the pipeline builds, updates and closes them before it."""
        return ()

    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        """Create this stage's index over ``documents`` (no-op for stateless stages)."""

    def add(self, documents: Sequence[Document]) -> None:
        """Add or replace documents in this stage's index (no-op for stateless stages)."""

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Remove documents from this stage's index (no-op for stateless stages)."""

    def close(self) -> None:
        """Release files and models."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
