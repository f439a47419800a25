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

Models: a Hugging Face id or folder, a ``.gguf`` file, or the packaged SmolLM2-135M-Instruct
(``"smollm2"`` / ``"HuggingFaceTB/SmolLM2-135M-Instruct"``). A GGUF model is unpacked once
(about 20 s) and saved as safetensors under ``cache_home()/models/<name>``; later loads read that copy.
torch and transformers are imported only when a model is loaded or used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamrank.errors import ConfigError, RankerError
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, ModelCall, Ranking

if TYPE_CHECKING:
    import torch

    from streamrank.context import PipelineContext
    from streamrank.rankers.kv import PrefixCache
    from streamrank.rankers.prompts import PromptBuilder

log = logging.getLogger(__name__)

_USER_SLOT = "\x00STREAMRANK_USER_MESSAGE\x00"


class LowRankOptions(BaseModel):
    """``lowrank = {ratio = 0.5, backend = "auto"}``: replace linear layers by SVD factors (kernels/)."""

    model_config = ConfigDict(extra="allow")

    ratio: float | None = Field(0.5, gt=0.0)
    """Fraction of each layer's parameters kept (other keys, e.g. ``energy``, ``calibration``, go to the kernels package)."""
    backend: str = "auto"


class LLMSettings(BaseModel):
    """The ``[stages.llm]`` block every LLM stage accepts."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "smollm2"
    """Hugging Face id, local folder, ``.gguf`` file, or ``smollm2`` (the packaged GGUF)."""
    max_passage_tokens: int = Field(100, ge=4)
    """Passages are cut to this many tokens (the prompt's fixed parts never are)."""
    max_query_tokens: int = Field(64, ge=4)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    """Default: the pipeline's device, else CUDA when available, else CPU."""
    lowrank: LowRankOptions | None = None

    def cache_key(self, device: str) -> tuple[Any, ...]:
        """What identifies one loaded model (passage/query limits do not)."""
        lowrank = self.lowrank.model_dump_json() if self.lowrank else None
        return ("causal-lm", self.model, self.dtype, device, lowrank)


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
        prefix: PrefixCache | None = None,
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

    def next_token_logits(
        self,
        sequences: Sequence[Sequence[int]],
        token_ids: Sequence[int],
        *,
        prefix: PrefixCache | None = None,
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
        self, ids: Sequence[int], max_new_tokens: int, *, prefix: PrefixCache | None = None
    ) -> Generation:
        """Greedy decoding after ``ids`` (continuing ``prefix`` when given) until a stop token."""
        import torch

        from streamrank.rankers.kv import new_cache

        started = time.perf_counter()
        past = prefix.length if prefix is not None else 0
        if past + len(ids) + max_new_tokens > self.context_length:
            raise RankerError(
                f"{self.name}: prompt of {past + len(ids)} tokens + {max_new_tokens} new tokens exceeds "
                f"the model's context of {self.context_length}"
            )
        out_ids: list[int] = []
        with torch.inference_mode():
            borrowed = prefix.borrow(1) if prefix is not None else contextlib.nullcontext(new_cache(self))
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
                    step = torch.tensor([[token]], dtype=torch.long)
        return Generation(out_ids, self.decode(out_ids), len(ids), time.perf_counter() - started)


# ---- loading ---------------------------------------------------------------------------------
def resolve_device(settings: LLMSettings, context_device: str | None = None) -> str:
    if settings.device or context_device:
        return str(settings.device or context_device)
    from streamrank.models import default_device

    return default_device()


def load_causal_lm(settings: LLMSettings, device: str | None = None) -> CausalLM:
    """Load the model ``settings.model`` names (see the module docstring), apply low-rank if asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamrank.models import SMOLLM2, is_smollm2, smollm2_gguf_path

    dtype = getattr(torch, settings.dtype)
    device = device or resolve_device(settings)
    name = settings.model
    gguf: Path | None = None
    if is_smollm2(name):
        gguf, name = smollm2_gguf_path(), SMOLLM2
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.exists():
            raise ConfigError(f"GGUF file {name!r} not found")
    source = str(unpacked_gguf(gguf)) if gguf is not None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"cannot load causal LM {settings.model!r}: {exc}") from exc
    model.to(device).eval()
    if settings.lowrank is not None:
        model = apply_lowrank_options(model, settings.lowrank, tokenizer)
    return CausalLM(model, tokenizer, name)


def unpacked_gguf(gguf: Path) -> Path:
    """A safetensors copy of ``gguf`` under ``cache_home()/models``, made on first use (about 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamrank.models import cache_home

    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    target = cache_home() / "models" / f"{gguf.stem}-{tag}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    log.info("unpacking %s into %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model that still carries its GGUF quantizer; the weights are
    # already de-quantized to fp32, so dropping the quantizer and its config loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{time.monotonic_ns()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def lowrank_module() -> Any | None:
    """``streamrank.kernels.lowrank`` if it is installed and provides ``apply_lowrank``."""
    try:
        from streamrank.kernels import lowrank
    except ImportError:
        return None
    return lowrank if callable(getattr(lowrank, "apply_lowrank", None)) else None


def apply_lowrank_options(model: Any, options: LowRankOptions, tokenizer: Any = None) -> Any:
    """Replace the model's linear layers by low-rank factors through the kernels package.

    ``tokenizer`` is what calibrated (activation-aware) compression tokenizes its texts with.
    """
    module = lowrank_module()
    if module is None:
        raise ConfigError(
            "lowrank is set but streamrank.kernels.lowrank.apply_lowrank is not available in this build; "
            "remove `lowrank` from the llm settings"
        )
    raw = options.model_dump(exclude_unset=True)
    settings_cls = getattr(module, "LowRankSettings", None)
    try:
        if settings_cls is not None:  # the kernels package validates its own options (ratio, energy, backend)
            result = settings_cls.from_dict(raw).apply(model, tokenizer=tokenizer)
        else:
            result = module.apply_lowrank(model, ratio=options.ratio, backend=options.backend)
    except ValueError as exc:
        raise ConfigError(f"lowrank: {exc}") from exc
    return model if result is None else result


# ---- the stage base class ---------------------------------------------------------------------
class LLMRerankerConfig(StageConfig):
    """Options shared by the LLM rerankers."""

    depth: int = Field(20, ge=1)
    """How many of the incoming candidates are reranked; the rest keep their order below them."""
    llm: LLMSettings = Field(default_factory=LLMSettings)


class LLMReranker(BaseStage):
    """Base of the LLM rerankers: shared model, documents attached, top ``depth`` rescored."""

    Config: ClassVar[type[StageConfig]] = LLMRerankerConfig
    config: LLMRerankerConfig

    @property
    def llm(self) -> CausalLM:
        """The pipeline-wide model for these settings (loaded on first use)."""
        return shared_llm(self.context, self.config.llm)

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        depth = self.config.depth
        self.context.require_documents(rankings, depth, self.name)
        out = []
        for ranking in rankings:
            top = ranking.candidates[:depth]
            if not top:
                out.append(ranking)
                continue
            scores = self.score_candidates(ranking, top)
            out.append(merge_reranked(ranking, self.name, scores, depth, self.config.k))
        return out

    @property
    def builder(self) -> PromptBuilder:
        """The prompt builder for this stage's model and settings (shared by stages that match)."""
        from streamrank.rankers.prompts import PromptBuilder

        key = ("prompt-builder", self.config.llm.model_dump_json())
        return self.context.shared(key, lambda: PromptBuilder(self.llm, self.config.llm))

    def listwise_prefix(self, ranking: Ranking, query: str) -> PrefixCache:
        """The KV cache of the query's instruction + query prefix; its computation is a recorded call."""
        from streamrank.rankers.kv import PrefixCache

        prefix = PrefixCache(self.llm, self.builder.listwise_prefix(query))
        self.record(
            ranking,
            prompt_tokens=prefix.computed_tokens,
            seconds=prefix.seconds,
            note="prefix cache: instruction + query",
        )
        return prefix

    def score_candidates(self, ranking: Ranking, top: list[Candidate]) -> list[float]:
        """Scores parallel to ``top`` (higher is better); record every model call on ``ranking``."""
        raise NotImplementedError

    def record(
        self, ranking: Ranking, *, prompt_tokens: int, output_tokens: int = 0, seconds: float, note: str
    ) -> None:
        ranking.calls.append(
            ModelCall(self.name, self.llm.name, prompt_tokens, output_tokens, round(seconds, 6), note)
        )


def shared_llm(context: PipelineContext, settings: LLMSettings) -> CausalLM:
    device = resolve_device(settings, context.device)
    return context.shared(settings.cache_key(device), lambda: load_causal_lm(settings, device))


def merge_reranked(ranking: Ranking, stage: str, scores: Sequence[float], depth: int, k: int) -> Ranking:
    """Reorder the top ``depth`` by ``scores``; the rest follow in their incoming order, scored below."""
    top, rest = ranking.candidates[:depth], ranking.candidates[depth:]
    floor = min(scores) if scores else 0.0
    tail = [floor - 1.0 - i for i in range(len(rest))]
    return ranking.rescored(stage, [*scores, *tail], keep=k, candidates=[*top, *rest])


def order_scores(order: Sequence[int]) -> list[float]:
    """Scores from a permutation (``order[r]`` = index ranked r-th): best gets ``len(order)``."""
    scores = [0.0] * len(order)
    for rank, index in enumerate(order):
        scores[index] = float(len(order) - rank)
    return scores
