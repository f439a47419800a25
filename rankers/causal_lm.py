"""Causal-LM runtime shared by every LLM reranker.

One :class:`CausalLM` wraps a Hugging Face causal LM and its tokenizer and offers what the
rerankers need and nothing else:

- :meth:`CausalLM.logits_at`: FULL-vocabulary logits at chosen positions of a batch of token-id
  sequences (left or right padding, optional shared KV prefix); :meth:`CausalLM.next_token_logits`
  reads a given set of token ids out of them at the next-token position;
- :meth:`CausalLM.generate_greedy`: plain greedy decoding (the generative listwise baseline);
- :meth:`CausalLM.chat_frame`: the chat template split around the user message, so prompts can be
  assembled from separately tokenized parts (passages truncated, the template tail never).

Token accounting: every call returns the number of tokens the model actually computed (prompt tokens
not served from a KV cache) and, for generation, the tokens it wrote; each token is counted once.

Loading (model names, GGUF unpacking, low-rank compression, the pipeline-wide shared model) is in
:mod:`streamrank.rankers.causal_lm_loading`; KV-cache reuse in :mod:`streamrank.rankers.kv`, which
builds on this module (this one never imports it). torch and transformers are imported only when a
model is used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

from streamrank.errors import RankerError

if TYPE_CHECKING:
    import torch

_USER_SLOT = "\x00STREAMRANK_USER_MESSAGE\x00"


class CachedPrefix(Protocol):
    """A computed prompt prefix that forwards continue from (:class:`streamrank.rankers.kv.PrefixCache`)."""

    @property
    def length(self) -> int:
        """Tokens in the prefix: the positions of a continuation start there."""
        ...

    def borrow(self, batch: int = 1) -> AbstractContextManager[Any]:
        """The KV cache for one forward over ``batch`` continuations, restored afterwards."""
        ...


@dataclass
class Logits:
    """Result of one forward: per-sequence logits plus what it cost."""

    rows: list[torch.Tensor]
    """One float32 tensor per sequence: [number of requested positions, vocabulary]."""
    computed_tokens: int
    seconds: float


@dataclass
class Generation:
    """Result of greedy decoding for one prompt."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    """Prompt tokens computed (the part not served from a prefix cache)."""
    seconds: float

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


class CausalLM:
    """A loaded causal LM + tokenizer with the batched, padding-safe calls the rankers use."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self._frames: dict[str | None, tuple[str, str]] = {}

    # ---- tokens --------------------------------------------------------------------------
    @cached_property
    def context_length(self) -> int:
        config = (
            self.model.config.get_text_config()
            if hasattr(self.model.config, "get_text_config")
            else self.model.config
        )
        return int(getattr(config, "max_position_embeddings", 0) or 2048)

    @cached_property
    def vocab_size(self) -> int:
        """Width of the logits: the output layer's size (also when it was swapped for a low-rank one)."""
        head = self.model.get_output_embeddings()
        size = (
            getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
        )
        return int(size or self.model.config.vocab_size)

    @cached_property
    def pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """End-of-turn / end-of-text tokens that end generation."""
        ids = {self.tokenizer.eos_token_id}
        for text in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "</s>"):
            tid = self.tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return frozenset(i for i in ids if i is not None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (template markers in the text still map)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_frame(self, system: str | None = None) -> tuple[str, str]:
        """(head, tail) around a user message, from the chat template; the tail ends at the
        assistant turn's first token. Without a template: ("", "\\n")."""
        if system in self._frames:
            return self._frames[system]
        if not getattr(self.tokenizer, "chat_template", None):
            frame = ((system + "\n\n") if system else "", "\n")
        else:
            messages = [{"role": "user", "content": _USER_SLOT}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # templates without a system role (Gemma): fold it into the user turn
                messages = [
                    {"role": "user", "content": f"{system}\n\n{_USER_SLOT}" if system else _USER_SLOT}
                ]
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            head, sep, tail = text.partition(_USER_SLOT)
            if not sep:
                raise RankerError(
                    f"{self.name}: the chat template dropped the user message; cannot build prompts"
                )
            frame = (head, tail)
        self._frames[system] = frame
        return frame

    # ---- forward passes ------------------------------------------------------------------
    def logits_at(
        self,
        sequences: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        *,
        prefix: CachedPrefix | None = None,
        padding: Literal["left", "right"] = "left",
    ) -> Logits:
        """Full-vocabulary logits at ``positions[i]`` (indices into ``sequences[i]``) of each sequence.

        The batch is padded on ``padding``'s side with an attention mask and position ids that
        start at 0 (or at the prefix length) for every sequence, so a padded row computes what it
        would alone. With ``prefix``, every sequence continues that cached prefix (right padding).
        """
        import torch

        if len(sequences) != len(positions):
            raise ValueError("one list of positions per sequence is needed")
        if not sequences:
            return Logits([], 0, 0.0)
        lengths = [len(s) for s in sequences]
        if min(lengths) == 0:
            raise ValueError("cannot run the model on an empty sequence")
        if prefix is not None:
            padding = "right"
        started = time.perf_counter()
        n, width = len(sequences), max(lengths)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        offsets = []
        for i, seq in enumerate(sequences):
            start = width - len(seq) if padding == "left" else 0
            ids[i, start : start + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, start : start + len(seq)] = 1
            offsets.append(start)
        past = prefix.length if prefix is not None else 0
        if past + width > self.context_length:
            raise RankerError(
                f"{self.name}: prompt of {past + width} tokens exceeds the model's context of "
                f"{self.context_length}; lower max_passage_tokens or the window size"
            )
        position_ids = past + (mask.cumsum(-1) - 1).clamp(min=0)
        wanted = [[offsets[i] + p for p in row] for i, row in enumerate(positions)]
        for i, row in enumerate(wanted):
            if any(p < offsets[i] or p >= offsets[i] + lengths[i] for p in row):
                raise ValueError(f"position out of range for sequence {i} of length {lengths[i]}")
        keep = sorted({p for row in wanted for p in row})
        column = {p: j for j, p in enumerate(keep)}
        padded = min(lengths) != width
        full_mask = torch.cat([torch.ones((n, past), dtype=torch.long), mask], dim=1) if padded else None
        with torch.inference_mode():
            if prefix is not None:
                with prefix.borrow(n) as cache:
                    out = self.forward_ids(ids, full_mask, position_ids, cache, torch.tensor(keep))
            else:
                out = self.forward_ids(ids, full_mask, position_ids, None, torch.tensor(keep))
            logits = out.logits.float()
            rows = [logits[i, [column[p] for p in row]] for i, row in enumerate(wanted)]
        return Logits(rows, sum(lengths), time.perf_counter() - started)

    def forward_ids(self, ids: Any, mask: Any, position_ids: Any, cache: Any, keep: Any) -> Any:
        """One raw model call (tensors moved to the model's device); logits only at ``keep``."""
        dev = self.device
        return self.model(
            input_ids=ids.to(dev),
            attention_mask=None if mask is None else mask.to(dev),
            position_ids=position_ids.to(dev),
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=keep.to(dev) if hasattr(keep, "to") else keep,
        )

    def new_cache(self) -> Any:
        """An empty KV cache for this model: a transformers DynamicCache, or, when the model's attention
        runs on the fused low-rank kernels, a rank-space cache (:mod:`streamrank.kernels.decoder`)."""
        from streamrank.kernels.decoder import new_cache

        return new_cache(self.model)

    def next_token_logits(
        self,
        sequences: Sequence[Sequence[int]],
        token_ids: Sequence[int],
        *,
        prefix: CachedPrefix | None = None,
        padding: Literal["left", "right"] = "left",
    ) -> tuple[torch.Tensor, Logits]:
        """Logits of ``token_ids`` for the token after each sequence: [len(sequences), len(token_ids)].

        Read from the full-vocabulary logits; an id outside the vocabulary or a non-finite value is
        a RankerError (never silently a zero).
        """
        import torch

        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RankerError(f"{self.name}: token ids {bad} are outside the vocabulary ({self.vocab_size})")
        result = self.logits_at(sequences, [[len(s) - 1] for s in sequences], prefix=prefix, padding=padding)
        index = torch.tensor(list(token_ids), dtype=torch.long)
        picked = torch.stack([row[0].index_select(0, index.to(row.device)).cpu() for row in result.rows])
        if not torch.isfinite(picked).all():
            raise RankerError(f"{self.name}: non-finite logits for the requested tokens")
        return picked, result

    def generate_greedy(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        *,
        prefix: CachedPrefix | None = None,
        stop_after: Collection[int] = (),
    ) -> Generation:
        """Greedy decoding after ``ids`` (continuing ``prefix`` when given) until a stop token, or just
        after one of ``stop_after`` (kept in the output: a question's ``?``)."""
        import torch

        started = time.perf_counter()
        past = prefix.length if prefix is not None else 0
        if past + len(ids) + max_new_tokens > self.context_length:
            raise RankerError(
                f"{self.name}: prompt of {past + len(ids)} tokens + {max_new_tokens} new tokens exceeds "
                f"the model's context of {self.context_length}"
            )
        out_ids: list[int] = []
        with torch.inference_mode():
            borrowed = prefix.borrow(1) if prefix is not None else contextlib.nullcontext(self.new_cache())
            with borrowed as cache:
                step = torch.tensor([list(ids)], dtype=torch.long)
                for _ in range(max_new_tokens):
                    pos = torch.arange(past, past + step.shape[1]).unsqueeze(0)
                    out = self.forward_ids(step, None, pos, cache, torch.tensor([step.shape[1] - 1]))
                    past += step.shape[1]
                    token = int(out.logits[0, -1].argmax())
                    if token in self.stop_ids:
                        break
                    out_ids.append(token)
                    if token in stop_after:
                        break
                    step = torch.tensor([[token]], dtype=torch.long)
        return Generation(out_ids, self.decode(out_ids), len(ids), time.perf_counter() - started)
