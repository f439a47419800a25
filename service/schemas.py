"""Request and response bodies of the HTTP API (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag


def _valid_unicode(text: str) -> str:
    """Reject lone UTF-16 surrogates (JSON allows ``"\\ud800"``), which no store or response can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone UTF-16 surrogate ({text[exc.start]!r} at character {exc.start}): not valid Unicode text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A request string: any Unicode text, but no lone surrogates."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- search --------------------------------------------------------------------------------
class SearchRequest(_Strict):
    query: Text = Field(min_length=1, description="Query text.")
    k: int = Field(10, ge=1, description="How many documents to return.")
    pipeline: Text | None = Field(None, description="Pipeline name (GET /pipelines); default: the service's default.")
    user_history: list[Text] = Field(default_factory=list, description="Ids of documents the user engaged with.")
    deadline_ms: float | None = Field(
        None, gt=0, description="Answer within this many ms, cutting a late stage (the answer is then `degraded`)."
    )


class SearchHit(_Open):
    rank: int
    id: str
    score: float
    stage_scores: dict[str, float]
    title: str | None = None
    text: str | None = None


class QueryOut(_Open):
    id: str
    text: str


class SearchResponse(_Open):
    """The shared ranking shape (``streamrank search --json``) plus service fields."""

    query: QueryOut
    results: list[SearchHit]
    timings_ms: dict[str, float] = Field(description="Wall time of each stage over the batch this request rode in.")
    model_calls: list[dict[str, Any]]
    degraded: bool
    notes: list[str]
    pipeline: str
    batch_size: int = Field(description="Requests fused into the pipeline call that answered this one.")
    queue_ms: float
    total_ms: float
    request_id: str


# ---- rerank (Cohere / Jina compatible) -----------------------------------------------------
class RerankDocument(_Open):
    text: Text
    title: Text = ""


def _document_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "object" if isinstance(value, dict | RerankDocument) else None


RerankItem = Annotated[
    Annotated[Text, Tag("text")] | Annotated[RerankDocument, Tag("object")],
    Discriminator(
        _document_kind,
        custom_error_type="invalid_document",
        custom_error_message='each document must be a string or an object {"text": ...}',
    ),
]


class RerankRequest(_Open):
    """Cohere v1/v2 and Jina rerank requests; unknown fields (``max_tokens_per_doc``...) are ignored."""

    model: Text | None = Field(None, description="Pipeline name; default: the service's default pipeline.")
    query: Text = Field(min_length=1)
    documents: list[RerankItem] = Field(min_length=1, description='Strings, or objects {"text": ...}.')
    top_n: int | None = Field(None, ge=1)
    return_documents: StrictBool = False
    deadline_ms: float | None = Field(None, gt=0)


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="The pipeline's final score (higher is better; not calibrated to [0, 1]).")
    document: RerankResultDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    meta: dict[str, Any]
    usage: dict[str, int]
    degraded: bool = False
    notes: list[str] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    request_id: str


# ---- documents -----------------------------------------------------------------------------
class DocumentIn(_Strict):
    id: Text = Field(min_length=1)
    text: Text
    title: Text = ""


class UpsertRequest(_Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    pipeline: Text | None = Field(None, description="Any pipeline over the index to write (all sharing it are updated).")


class UpsertResponse(BaseModel):
    upserted: int
    ids: list[str]
    request_id: str


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    request_id: str


class DeleteResponse(BaseModel):
    deleted: str
    request_id: str


# ---- service ---------------------------------------------------------------------------------
class StageInfo(BaseModel):
    name: str
    kind: str


class PipelineInfo(BaseModel):
    name: str
    description: str
    default: bool
    stages: list[StageInfo]
    source: str | None
    corpus: str | None
    index_dir: str | None


class PipelinesResponse(BaseModel):
    pipelines: list[PipelineInfo]
    request_id: str


class StatusResponse(BaseModel):
    status: str
    message: str | None = None
    pipelines: list[str] = Field(default_factory=list)
    recovered: dict[str, dict[str, int]] = Field(default_factory=dict)
    request_id: str


class ErrorResponse(BaseModel):
    message: str
    type: str
    request_id: str
    errors: list[dict[str, Any]] | None = None
