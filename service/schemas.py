"""Request and response bodies of the HTTP API (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StrictBool,
    Tag,
    field_validator,
)


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

Number = Annotated[float, Strict()]
"""A JSON number (not a string, not a boolean)."""


def _json_integer(value: Any) -> Any:
    """Integer fields take a JSON integer: ``5`` (and ``5.0``, which JSON Schema counts as one), not
    ``"5"``, ``true`` or ``5.5`` (a ``mode="before"`` field validator: the schema stays plain)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError("must be an integer (a JSON number, not a string or a boolean)")
    return value

_BAD_ID_CATEGORIES = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator"}


def _valid_id(doc_id: str) -> str:
    """A document id: NFC-normalised, no control characters, no whitespace at either end."""
    doc_id = unicodedata.normalize("NFC", doc_id)
    if not doc_id.strip():
        raise ValueError("a document id must not be empty or only whitespace")
    if doc_id != doc_id.strip():
        raise ValueError("a document id must not start or end with whitespace")
    for position, char in enumerate(doc_id):
        kind = _BAD_ID_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            raise ValueError(f"a document id must not contain {kind} ({char!r} at character {position})")
    return doc_id


DocumentId = Annotated[
    str,
    AfterValidator(_valid_unicode),
    AfterValidator(_valid_id),
    Field(
        min_length=1,
        description="Stored NFC-normalised; no control characters or surrounding whitespace; at most "
        "`max_id_bytes` UTF-8 bytes.",
        json_schema_extra={"pattern": r"^[^\s\x00-\x1f\x7f-\x9f\u2028\u2029](?:[^\x00-\x1f\x7f-\x9f\u2028\u2029]*[^\s\x00-\x1f\x7f-\x9f\u2028\u2029])?$"},
    ),
]


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
    deadline_ms: Number | None = Field(
        None, gt=0, description="Answer within this many ms, cutting a late stage (the answer is then `degraded`)."
    )

    _strict_k = field_validator("k", mode="before")(_json_integer)


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
    deadline_ms: Number | None = Field(None, gt=0)

    _strict_top_n = field_validator("top_n", mode="before")(_json_integer)


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
    id: DocumentId
    text: Text = Field(description="At most `max_document_chars` characters together with `title`.")
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


class BulkDeleteRequest(_Strict):
    ids: list[Text] = Field(min_length=1, description="Ids to remove (any stored id, however long).")
    pipeline: Text | None = Field(None, description="Any pipeline over the index to write (all sharing it are updated).")


class BulkDeleteResponse(BaseModel):
    deleted: list[str]
    missing: list[str] = Field(description="Ids the store did not hold.")
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
    status: str = Field(description="`ok` (liveness); `ready` or `degraded` (readiness, HTTP 200); `loading`, `error` or `stopping` (503).")
    message: str | None = None
    pipelines: list[str] = Field(default_factory=list)
    recovered: dict[str, dict[str, int]] = Field(default_factory=dict)
    writable: bool | None = Field(None, description="Whether every index folder can take a write now.")
    problems: list[str] = Field(default_factory=list, description="Why writes would fail, or recovery did not finish.")
    quarantined: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Per pipeline: stored documents an index refused at startup (id -> reason)."
    )
    request_id: str


class ErrorResponse(BaseModel):
    message: str
    type: str
    request_id: str
    errors: list[dict[str, Any]] | None = None
