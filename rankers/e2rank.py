"""Embedding-listwise reranking (E2Rank, 2025): the listwise prompt, embedded, is the query.

E2Rank writes the usual listwise prompt (instruction, the top candidates, the query), embeds it
with the same model that embeds the documents and ranks the candidates by cosine to it: the
candidates' text acts as pseudo-relevance feedback inside one embedding. The published setting
(Alibaba-NLP/E2Rank ``src/eval.py``) is kept for the prompt: the top 20 passages go into it and
the whole top 100 is reranked in one pass. E2Rank scores by the cosine with the prompt embedding
alone, which assumes an encoder trained for it; ``query_weight`` mixes in the plain query's cosine,
``score = (1 - w) cos(d, prompt) + w cos(d, query)``, and defaults to 0.8, tuned on SciFact train
for the off-the-shelf all-MiniLM-L6-v2 (set 0 for E2Rank's own scoring).

Truncation. The prompt must fit the encoder (all-MiniLM-L6-v2: 256 wordpieces), so it is built in
token space: the instruction, the ``[i]`` markers and the query are reserved first and never cut
(passages are dropped from the end if even their markers do not fit; the query itself is cut only
if it alone exceeds the limit). What is left is shared out over the passages by water-filling:
each passage keeps its first ``min(length, fair share)`` tokens and what short passages leave is
shared among the longer ones. With MiniLM, a SciFact claim and 20 passages, that is about 7
tokens per passage: the title or the opening words of each; with EmbeddingGemma (2,048 tokens) about
90. How many passages fit, and how long each was kept, goes into the ranking's notes.

Prompts. An encoder that defines sentence-transformers prompts (EmbeddingGemma) gets its ``query``
prompt before the pseudo-query and the plain query, and its ``document`` prompt before passages, as
the dense stage does; its tokens are reserved before the passages are fitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from streamrank.encoding import SentenceEncoding
from streamrank.errors import IndexMissingError
from streamrank.models import MINILM
from streamrank.rankers.base import Reranker
from streamrank.stage import BaseStage, StageConfig, VectorSource, require_vector_source
from streamrank.types import Ranking

if TYPE_CHECKING:
    import numpy as np


DEFAULT_INSTRUCTION = (
    "Given a web search query and some relevant documents, rerank the documents that answer the query:"
)
PROMPT = "{instruction}\nDocuments:\n{documents}\nSearch Query: {query}"


def render_prompt(instruction: str, query: str, passages: Sequence[str]) -> str:
    """E2Rank's listwise prompt: instruction, ``[1] passage`` lines, then the query."""
    documents = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, start=1))
    return PROMPT.format(instruction=instruction, documents=documents, query=query)


def fair_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` tokens over passages of ``lengths``: equal shares, unused share passed on."""
    shares = [0] * len(lengths)
    left = max(budget, 0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for done, i in enumerate(order):
        shares[i] = min(lengths[i], left // (len(order) - done))
        left -= shares[i]
    return shares


@dataclass(frozen=True)
class PseudoQuery:
    text: str
    tokens: int
    """Length of ``text`` in the encoder's tokens, special tokens included."""
    passage_tokens: tuple[int, ...]
    """Tokens kept from each passage that made it into the prompt."""


def build_pseudo_query(
    tokenizer: Any, query: str, passages: Sequence[str], *, instruction: str, max_tokens: int
) -> PseudoQuery:
    """The longest E2Rank prompt over ``passages`` that fits ``max_tokens`` and keeps the whole query."""

    def count(text: str) -> int:
        return len(tokenizer(text, verbose=False)["input_ids"])

    def head(text: str, ids: list[int], n: int) -> str:
        """The first ``n`` tokens of ``text`` (the text itself when it is no longer)."""
        if n >= len(ids):
            return text
        return tokenizer.decode(ids[:n], skip_special_tokens=True) if n else ""

    def fit(render: Callable[[int], tuple[str, tuple[int, ...]]], budget: int) -> PseudoQuery:
        # decoded heads can re-tokenise a little longer than counted: shrink until the text fits
        while True:
            text, kept = render(budget)
            tokens = count(text)
            if tokens <= max_tokens or budget <= 0:
                return PseudoQuery(text, tokens, kept)
            budget = max(0, budget - (tokens - max_tokens))

    def tokens_of(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    n = len(passages)
    while n and count(render_prompt(instruction, query, [""] * n)) > max_tokens:
        n -= 1
    if n == 0:  # no passage (or not even the markers) fit: only the query, cut if it alone is too long
        query_ids = tokens_of(query)
        return fit(lambda b: (render_prompt(instruction, head(query, query_ids, b), []), ()), len(query_ids))
    ids = [tokens_of(p) for p in passages[:n]]

    def with_passages(budget: int) -> tuple[str, tuple[int, ...]]:
        shares = fair_shares([len(x) for x in ids], budget)
        return render_prompt(
            instruction, query, [head(p, x, s) for p, x, s in zip(passages, ids, shares, strict=False)]
        ), tuple(shares)

    return fit(with_passages, max_tokens - count(render_prompt(instruction, query, [""] * n)))


class EmbeddingListwiseConfig(StageConfig):
    model: str = MINILM
    """Sentence-transformers model for prompt and documents (the dense stage's, so stored vectors are reused)."""
    depth: int = Field(100, ge=1)
    """How many of the incoming candidates are reranked (the rest follow in their incoming order)."""
    prompt_docs: int = Field(20, ge=0)
    """How many of the top candidates go into the pseudo-query (E2Rank: 20)."""
    query_weight: float = Field(0.8, ge=0.0, le=1.0)
    """Weight of the plain query's cosine. 0 is E2Rank's own scoring, right for E2Rank-trained encoders;
    0.8 was best for off-the-shelf MiniLM on SciFact train (0.663 against 0.455 at 0)."""
    instruction: str = DEFAULT_INSTRUCTION
    max_length: int | None = Field(None, ge=8)
    """Token limit of the prompt; None (or more than the encoder takes) means the encoder's own."""
    batch_size: int = Field(32, ge=1)
    use_model_prompts: bool = True
    """Use the encoder's own query/document prompts when it defines them (as the dense stage does)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Encoder dtype; the dense stage's, so that both share one loaded model and the same vectors."""
    vectors_from: str | None = None
    """Name of the pipeline's dense stage whose stored document vectors this stage reuses instead of
    encoding candidates again; its model, dtype and prompts must be this stage's (checked at load time)."""


class EmbeddingListwise(Reranker):
    """Reranks the top ``depth`` by cosine to the embedded listwise prompt of the top ``prompt_docs``."""

    Config = EmbeddingListwiseConfig
    config: EmbeddingListwiseConfig
    documents_label: ClassVar[str | None] = "reranker"

    def __init__(self, config: EmbeddingListwiseConfig, context: Any) -> None:
        super().__init__(config, context)
        self._vectors: VectorSource | None = None

    @property
    def encoding(self) -> SentenceEncoding:
        cfg = self.config
        return SentenceEncoding(
            self.context, cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size, use_model_prompts=cfg.use_model_prompts
        )

    @property
    def encoder(self) -> Any:
        return self.encoding.model

    def max_tokens(self) -> int:
        """Tokens the pseudo-query may take: the encoder's limit (or ``max_length``) less its query prompt."""
        limit = self.encoder.max_seq_length
        limit = min(limit, self.config.max_length) if self.config.max_length else limit
        return limit - self.encoding.prompt_tokens("query")

    def pseudo_query(self, query: str, passages: Sequence[str]) -> PseudoQuery:
        """The prompt this stage embeds for ``query`` given the ranked ``passages`` (top first)."""
        return build_pseudo_query(
            self.encoder.tokenizer,
            query,
            passages[: self.config.prompt_docs],
            instruction=self.config.instruction,
            max_tokens=self.max_tokens(),
        )

    def references(self) -> dict[str, str]:
        return {"vectors_from": self.config.vectors_from} if self.config.vectors_from else {}

    def bind(self, key: str, stage: BaseStage) -> None:
        cfg = self.config
        wanted = {"model": cfg.model, "dtype": cfg.dtype, "document_prefix": "",
                  "use_model_prompts": cfg.use_model_prompts, "lowrank": None}
        self._vectors = require_vector_source(self, key, stage, wanted)

    def _dense_index(self) -> VectorSource | None:
        """The dense stage ``vectors_from`` names (its stored vectors), if any."""
        return self._vectors

    def _doc_vectors(
        self, rankings: Sequence[Ranking], texts: Sequence[Sequence[str]]
    ) -> tuple[dict[str, np.ndarray], int]:
        """A vector for every pool text (cache, then the dense index, then the encoder); also how many were encoded."""
        wanted = {
            t: c.doc_id
            for r, pool in zip(rankings, texts, strict=True)
            for c, t in zip(r.candidates, pool, strict=False)
        }
        cache = self.encoding.cache("document")
        found = cache.get_many(wanted)
        missing = [t for t in wanted if t not in found]
        dense = self._dense_index() if missing and self.context.index_dir is not None else None
        if dense is not None:  # stored vectors for candidates whose text is the corpus's own
            try:
                stored = self.context.store.get_many([wanted[t] for t in missing])
                from_index = [
                    t for t in missing if (d := stored.get(wanted[t])) is not None and d.contents == t
                ]
                if from_index:
                    found.update(
                        zip(from_index, dense.embeddings_for([wanted[t] for t in from_index]), strict=True)
                    )
            except (KeyError, IndexMissingError):  # the index is not built (or lacks them): encode instead
                pass
            missing = [t for t in missing if t not in found]
        if missing:
            found.update(zip(missing, self.encoding.encode(missing, "document"), strict=True))
        cache.put_many(found)
        return found, len(missing)

    def rerank_batch(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """The batch's prompts, queries and passages encoded together, then each query reranked."""
        import numpy as np

        cfg = self.config
        self.require_documents(rankings)
        texts = [self.candidate_texts(r) for r in rankings]
        active = [i for i, pool in enumerate(texts) if pool]
        if not active:
            return list(rankings)
        _ = self.encoder  # load the model before the clock starts
        started = time.perf_counter()
        prompts = {i: self.pseudo_query(rankings[i].query.text, texts[i]) for i in active}
        # cached: a repeated query (or a tuning grid over query_weight) embeds its pseudo-query once
        prompt_vecs, _ = self.encoding.encode_cached([prompts[i].text for i in active], "query")
        query_vecs = (
            self.encoding.encode_cached([rankings[i].query.text for i in active], "query")[0]
            if cfg.query_weight
            else None
        )
        vectors, encoded = self._doc_vectors([rankings[i] for i in active], [texts[i] for i in active])
        seconds = (time.perf_counter() - started) / len(active)

        out = list(rankings)
        for row, i in enumerate(active):
            docs = np.stack([vectors[t] for t in texts[i]])
            scores = (1.0 - cfg.query_weight) * (docs @ prompt_vecs[row])
            if query_vecs is not None:
                scores += cfg.query_weight * (docs @ query_vecs[row])
            ranked = self.merge_reranked(rankings[i], scores.tolist())
            p = prompts[i]
            kept = p.passage_tokens
            note = f"pseudo-query: {len(kept)} passages, {min(kept, default=0)}-{max(kept, default=0)} tokens each"
            if encoded:
                note += f"; {encoded} passages encoded in this batch"
            ranked.calls = list(rankings[i].calls)  # the call goes on the output; the input is left as it was
            ranked.notes = [
                *rankings[i].notes,
                f"{self.name}: the pseudo-query holds {len(kept)} of the top "
                f"{min(cfg.prompt_docs, len(texts[i]))} passages, {min(kept, default=0)}-{max(kept, default=0)} "
                f"tokens each ({p.tokens} of {self.max_tokens()} tokens)",
            ]
            self.record_call(ranked, cfg.model, prompt_tokens=p.tokens, seconds=seconds, note=note)
            out[i] = ranked
        return out
