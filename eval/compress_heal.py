"""Healing a compressed model: distil it toward its dense original, training the low-rank factors only.

- Sentence encoders (:func:`heal_encoder`): per batch of corpus texts, ``1 - cos`` between the student's
  and the teacher's sentence embeddings plus ``1 - cos`` between their token embeddings (the
  transformer outputs before pooling, padding left out), averaged. Passages and their first words (as
  short, query-like texts) are both trained on, since the encoder embeds queries too.
- Causal LMs (:func:`heal_causal_lm`): ``KL(teacher || student)`` of the next-token distributions at every
  position that is not padding (temperature 1), over corpus texts.

Only ``U`` and ``V`` of every :class:`~streamrank.kernels.svd.LowRankLinear` are trained (AdamW, linear
warm-up then cosine decay, gradient norm clipped at 1); biases, norms and embeddings stay as they were.
Training runs on the unfused backend (the plain two-GEMM product and the model's own attention, the
same function as the fused kernels), in eval mode (no dropout); the backend is restored afterwards.
Batches depend on ``seed`` only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamrank.kernels.lowrank import set_backend
from streamrank.kernels.svd import lowrank_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealSettings:
    """How long and how fast to heal."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    max_length: int = 128
    warmup: int = 10
    seed: int = 0
    log_every: int = 10


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


def _lr_factor(step: int, settings: HealSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / span))


def _loop(
    student: nn.Module,
    texts: Sequence[str],
    settings: HealSettings,
    loss_of: Callable[[list[str]], torch.Tensor],
) -> HealReport:
    """AdamW on the factors over batches of ``texts``; ``loss_of(batch)`` gives the distillation loss."""
    if not texts:
        raise ValueError("no texts to heal on")
    params = factor_parameters(student)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    backends = {name: layer.backend for name, layer in lowrank_layers(student).items()}
    backend = next(iter(backends.values()))
    set_backend(student, "unfused")
    student.eval()
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for step in range(settings.steps):
            if len(order) < settings.batch_size:
                fresh = list(range(len(texts)))
                rng.shuffle(fresh)
                order += fresh
            batch = [texts[i] for i in order[: settings.batch_size]]
            del order[: settings.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, settings)
            with torch.enable_grad():
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % settings.log_every == 0 or step == settings.steps - 1:
                log.info("heal step %d/%d loss %.5f (%.0f s)", step + 1, settings.steps, losses[-1],
                         time.perf_counter() - started)  # fmt: skip
    finally:
        for p in params:
            p.requires_grad_(False)
        set_backend(student, backend)
    return HealReport(
        steps=settings.steps,
        seconds=round(time.perf_counter() - started, 1),
        trained_parameters=sum(p.numel() for p in params),
        loss_first=losses[0] if losses else float("nan"),
        loss_last=float(sum(losses[-10:]) / len(losses[-10:])) if losses else float("nan"),
        losses=[round(x, 6) for x in losses],
        settings=asdict(settings),
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
    student: nn.Module, teacher: nn.Module, texts: Sequence[str], settings: HealSettings
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

    return _loop(student, query_like(texts), settings, loss_of)


def heal_causal_lm(
    student: nn.Module, teacher: nn.Module, tokenizer: Any, texts: Sequence[str], settings: HealSettings
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

    return _loop(student, list(texts), settings, loss_of)
