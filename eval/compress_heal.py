"""Healing a compressed model: distil it toward its dense original, training the low-rank factors only.

- Sentence encoders (:func:`heal_encoder`): per batch of corpus texts, ``1 - cos`` between the student's
  and the teacher's sentence embeddings plus ``1 - cos`` between their token embeddings (the
  transformer outputs before pooling, padding left out), averaged. Passages and their first words (as
  short, query-like texts) are both trained on, since the encoder embeds queries too.
- Causal LMs (:func:`heal_causal_lm`): ``KL(teacher || student)`` of the next-token distributions at every
  position that is not padding (temperature 1), over corpus texts.

Only ``U`` and ``V`` of every :class:`~streamrank.kernels.svd.LowRankLinear` are trained, in the training
loop the rerankers use (:func:`~streamrank.eval.training.loop.run_loop`: AdamW, linear warm-up then cosine
decay, gradient norm clipped at 1, a progress bar, checkpoints that a rerun resumes from); biases, norms
and embeddings stay as they were.
Training runs on the unfused backend (the plain two-GEMM product and the model's own attention, the
same function as the fused kernels), in eval mode (no dropout); the backend is restored afterwards.
Batches depend on ``seed`` and the step only, so a resumed run heals exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamrank.kernels.lowrank import set_backend
from streamrank.kernels.svd import lowrank_layers


@dataclass(frozen=True)
class HealSettings:
    """How long and how fast to heal."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    max_length: int = 128
    warmup: int = 10
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class HealReport:
    """What healing did: losses at the start and end, the time it took."""

    steps: int
    seconds: float
    trained_parameters: int
    loss_first: float
    loss_last: float
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``U`` and ``V`` of every low-rank layer (what healing trains); everything else is frozen."""
    layers = lowrank_layers(model)
    if not layers:
        raise ValueError("the model has no low-rank layers: compress it before healing")
    trained = {id(p) for layer in layers.values() for p in (layer.U, layer.V)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return [p for layer in layers.values() for p in (layer.U, layer.V)]


class _Student:
    """The compressed model as the training loop sees it: its factors and a distillation loss."""

    def __init__(self, model: nn.Module, loss_of: Callable[[list[str]], torch.Tensor]) -> None:
        self.params = dict(zip(_factor_names(model), factor_parameters(model), strict=True))
        self.loss_of = loss_of

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.params

    def loss(self, batch: Sequence[str], rng: Any) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.enable_grad():
            return self.loss_of(list(batch)), {}


def _factor_names(model: nn.Module) -> list[str]:
    return [f"{name}.{part}" for name in lowrank_layers(model) for part in ("U", "V")]


def _loop(
    student: nn.Module,
    texts: Sequence[str],
    settings: HealSettings,
    loss_of: Callable[[list[str]], torch.Tensor],
    checkpoint: Path | None,
) -> HealReport:
    """The shared training loop (AdamW, warm-up then cosine decay, progress bar, checkpoints every
    ``checkpoint_every`` steps into ``checkpoint`` and resume from them) on the factors, over ``texts``."""
    import tempfile

    from streamrank.eval.training.loop import LoopSettings, run_loop

    if not texts:
        raise ValueError("no texts to heal on")
    backends = {name: layer.backend for name, layer in lowrank_layers(student).items()}
    backend = next(iter(backends.values()))
    set_backend(student, "unfused")
    student.eval()
    wrapped = _Student(student, loss_of)
    loop = LoopSettings(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        warmup=settings.warmup,
        decay="cosine",
        checkpoint_every=settings.checkpoint_every,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="streamrank-heal-") as scratch:
            folder = checkpoint if checkpoint is not None else Path(scratch)
            log = run_loop(wrapped, list(texts), loop, folder, resume=checkpoint is not None, desc="heal")
    finally:
        for p in wrapped.params.values():
            p.requires_grad_(False)
        set_backend(student, backend)
    losses = log.losses
    return HealReport(
        steps=settings.steps,
        seconds=round(log.seconds, 1),
        trained_parameters=sum(p.numel() for p in wrapped.params.values()),
        loss_first=losses[0] if losses else float("nan"),
        loss_last=float(sum(losses[-10:]) / len(losses[-10:])) if losses else float("nan"),
        losses=[round(x, 6) for x in losses],
        settings=asdict(settings),
        resumed_from=log.resumed_from,
    )


def query_like(texts: Sequence[str], words: int = 12) -> list[str]:
    """Each text and its first ``words`` words (short texts, as queries are)."""
    out = []
    for text in texts:
        out.append(text)
        head = " ".join(text.split()[:words])
        if head != text:
            out.append(head)
    return out


def heal_encoder(
    student: nn.Module,
    teacher: nn.Module,
    texts: Sequence[str],
    settings: HealSettings,
    checkpoint: Path | None = None,
) -> HealReport:
    """Distil a compressed SentenceTransformer ``student`` toward ``teacher`` (both loaded the same way)."""
    teacher.eval()
    student.max_seq_length = teacher.max_seq_length = min(settings.max_length, teacher.max_seq_length)
    device = next(teacher.parameters()).device
    tokenize = getattr(teacher, "preprocess", None) or teacher.tokenize  # tokenize: before 6.x

    def loss_of(batch: list[str]) -> torch.Tensor:
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in tokenize(batch).items()}
        with torch.no_grad():
            want = teacher(dict(features))
        got = student(dict(features))
        sentence = 1 - F.cosine_similarity(got["sentence_embedding"], want["sentence_embedding"], dim=-1)
        real = features["attention_mask"].bool()
        tokens = 1 - F.cosine_similarity(
            got["token_embeddings"][real], want["token_embeddings"][real], dim=-1
        )
        return sentence.mean() + tokens.mean()

    return _loop(student, query_like(texts), settings, loss_of, checkpoint)


def heal_causal_lm(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    settings: HealSettings,
    checkpoint: Path | None = None,
) -> HealReport:
    """Distil a compressed causal LM ``student`` toward ``teacher``: KL of next-token distributions."""
    teacher.eval()
    device = next(teacher.parameters()).device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions 0.. for every text (the model numbers them from 0)

    def loss_of(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(
            batch, return_tensors="pt", padding=True, truncation=True, max_length=settings.max_length
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with torch.no_grad():
            want = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        got = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        real = mask.bool()
        kl = F.kl_div(
            F.log_softmax(got[real], dim=-1),
            F.log_softmax(want[real], dim=-1),
            log_target=True,
            reduction="none",
        )
        return kl.sum(-1).mean()

    return _loop(student, list(texts), settings, loss_of, checkpoint)
