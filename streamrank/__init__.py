"""StreamRank: retrieval and one-pass listwise reranking behind one pipeline definition."""

from streamrank.compose import load_pipeline
from streamrank.pipeline import Pipeline
from streamrank.types import Candidate, Document, ModelCall, Query, Ranking

__all__ = ["Candidate", "Document", "ModelCall", "Pipeline", "Query", "Ranking", "load_pipeline"]
