"""The OpenAPI document with this service's request limits (settings, not model constants) written in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from streamrank.service.settings import Settings

REQUEST_LIMITS: dict[tuple[str, str], tuple[str, str]] = {
    ("SearchRequest", "query"): ("maxLength", "max_query_chars"),
    ("SearchRequest", "k"): ("maximum", "max_k"),
    ("RerankRequest", "query"): ("maxLength", "max_query_chars"),
    ("RerankRequest", "documents"): ("maxItems", "max_rerank_documents"),
    ("UpsertRequest", "documents"): ("maxItems", "max_upsert_documents"),
    ("BulkDeleteRequest", "ids"): ("maxItems", "max_upsert_documents"),
}
"""(schema, field) -> (JSON Schema keyword, setting): the per-service limits, shown in /openapi.json."""


def openapi_with_limits(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with this service's request limits written into the request schemas.

    The limits are settings, not constants of the models, so FastAPI cannot see them; the routes
    still check them (a 422 naming the setting).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema["components"]["schemas"]
            for (model, field), (keyword, setting) in REQUEST_LIMITS.items():
                prop = components[model]["properties"][field]
                prop[keyword] = getattr(settings, setting)
                prop["description"] = f"{prop.get('description', '')} At most {prop[keyword]} (`{setting}`).".strip()
        return schema

    return openapi
