"""One JSON shape for a ranking, used by the CLI (--json) and the HTTP service."""

from __future__ import annotations

from typing import Any

from streamrank.types import Ranking


def ranking_to_dict(ranking: Ranking) -> dict[str, Any]:
    return {
        "query": {"id": ranking.query.id, "text": ranking.query.text},
        "results": [
            {
                "rank": c.rank,
                "id": c.doc_id,
                "score": c.score,
                "stage_scores": c.stage_scores,
                "title": c.document.title if c.document else None,
                "text": c.document.text if c.document else None,
            }
            for c in ranking.candidates
        ],
        "timings_ms": ranking.timings_ms,
        "model_calls": [vars(call) for call in ranking.calls],
        "degraded": ranking.degraded,
        "notes": ranking.notes,
    }
