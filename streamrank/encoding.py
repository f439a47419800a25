"""A sentence-transformers model as the stages of a pipeline use it: loaded once, with its own prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

    from streamrank.context import PipelineContext

Role = Literal["query", "document"]


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

    def encode(
        self, texts: Sequence[str], role: Role, *, progress: bool = False, checkpoint: Path | None = None
    ) -> np.ndarray:
        """Normalised float32 embeddings of ``prompt(role) + text`` for each text (rows in order)."""
        from streamrank.models import encode_sentences

        return encode_sentences(
            self.model, texts, self.batch_size, progress, prompt=self.prompt(role), checkpoint=checkpoint
        )
