"""A sentence-transformers model as the stages of a pipeline use it: loaded once, with its own prompts."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

    from streamrank.context import PipelineContext

Role = Literal["query", "document"]


class VectorCache:
    """Thread-safe LRU map text -> unit vector; one per model, shared by the stages of a pipeline."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        with self._lock:
            found = {t: self._items[t] for t in texts if t in self._items}
            for t in found:
                self._items.move_to_end(t)
            return found

    def put_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._items.update(vectors)
            for t in vectors:
                self._items.move_to_end(t)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class SentenceEncoding:
    """Encodes queries and documents with one model of the pipeline's shared cache.

    A text gets the configured prefix for its role, else (``use_model_prompts``) the model's own
    sentence-transformers prompt for it (EmbeddingGemma: ``task: search result | query: `` and
    ``title: none | text: ``); models without prompts encode the plain text. ``loader`` builds a private
    variant of the model (a low-rank copy), shared under ``variant`` instead of the plain model.
    """

    def __init__(
        self,
        context: PipelineContext,
        model: str,
        *,
        dtype: str = "float32",
        batch_size: int = 64,
        use_model_prompts: bool = True,
        prefixes: dict[str, str] | None = None,
        variant: str | None = None,
        loader: Callable[[], Any] | None = None,
    ) -> None:
        self.context, self.name, self.dtype, self.batch_size = context, model, dtype, batch_size
        self.use_model_prompts = use_model_prompts
        self.prefixes = prefixes or {}
        self.variant, self.loader = variant, loader

    @property
    def model(self) -> Any:
        """The loaded sentence-transformers model (shared by every stage naming the same one)."""
        if self.loader is None:
            return self.context.sentence_encoder(self.name, self.dtype)
        return self.context.shared(("sentence-encoder", self.name, self.dtype, self.variant), self.loader)

    def prompt(self, role: Role) -> str:
        """Text put before every text of ``role``: the configured prefix, else the model's own prompt."""
        from streamrank.models import model_prompts

        prefix = self.prefixes.get(role, "")
        if prefix or not self.use_model_prompts:
            return prefix
        return model_prompts(self.name).get(role, "")

    def prompt_tokens(self, role: Role) -> int:
        """Length of the role's prompt in the model's tokens (no special tokens)."""
        prompt = self.prompt(role)
        if not prompt:
            return 0
        return len(self.model.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])

    def cache(self, role: Role) -> VectorCache:
        """The pipeline's text -> vector cache for this model, dtype and role prompt (shared by the stages:
        the dense stage's supplied-pool scoring fills it, E2Rank reads it)."""
        key = ("text-embeddings", self.name, self.dtype, self.variant, self.prompt(role))
        return self.context.shared(key, VectorCache)

    def encode_cached(self, texts: Sequence[str], role: Role) -> tuple[np.ndarray, int]:
        """Like :meth:`encode`, reusing vectors of texts seen before; also how many texts were encoded."""
        import numpy as np

        cache = self.cache(role)
        found = cache.get_many(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            fresh = dict(zip(missing, self.encode(missing, role), strict=True))
            cache.put_many(fresh)
            found.update(fresh)
        if not texts:
            return np.empty((0, self.model.get_embedding_dimension()), dtype=np.float32), 0
        return np.stack([found[t] for t in texts]), len(missing)

    def encode(
        self, texts: Sequence[str], role: Role, *, progress: bool = False, checkpoint: Path | None = None
    ) -> np.ndarray:
        """Normalised float32 embeddings of ``prompt(role) + text`` for each text (rows in order)."""
        from streamrank.models import encode_sentences

        return encode_sentences(
            self.model, texts, self.batch_size, progress, prompt=self.prompt(role), checkpoint=checkpoint
        )
