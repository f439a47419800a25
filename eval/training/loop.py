"""The training loop every reranker recipe shares: batches, AdamW, progress, checkpoints, resume.

Batches are a function of (seed, step) only: step ``t`` takes the next ``batch_size`` examples of
epoch ``e``'s permutation (``default_rng([seed, e])``), and the candidates of its examples are
shuffled by ``default_rng([seed, t, 1])`` (torch's generator, for dropout, is seeded per step). So a run resumed from a checkpoint (trainable weights,
optimizer state, loss curve, time) takes exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from streamrank.errors import ConfigError
from streamrank.eval.training.examples import Example

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class LoopSettings:
    """How long and how fast to train; ``seed``, ``batch_size`` and ``lr`` must match on resume."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    checkpoint_every: int = 50
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    decay: Literal["constant", "cosine"] = "constant"
    """After the warm-up: a constant rate, or cosine decay to 0 at ``steps`` (then a resume must keep ``steps``)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Compute dtype of the forward pass: ``bfloat16`` runs it under autocast (weights, optimizer state and
    the loss stay float32); ``auto`` is bfloat16 where it runs natively (AVX-512 BF16 / AMX, CUDA)."""

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): linear warm-up, then constant or cosine decay."""
        warmup = max(1, self.warmup)
        if step < warmup or self.decay == "constant":
            return self.lr * min(1.0, (step + 1) / warmup)
        span = max(1, self.steps - warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))


@dataclass
class TrainingLog:
    """What a run did: the loss of every step, seconds spent in the loop, examples consumed."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    examples_seen: int = 0
    resumed_from: int | None = None

    @property
    def examples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else 0.0


class Student(Protocol):
    """A model being trained: its trainable tensors and the loss of a batch of examples."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter for every tensor the optimizer updates (what a checkpoint stores)."""
        ...

    def loss(self, batch: Sequence[Any], rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss (to backpropagate) and its named parts (for the record)."""
        ...


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of ``step``: consecutive slices of seeded per-epoch permutations of ``range(n)``."""
    size = min(batch_size, n)
    out: list[int] = []
    position = step * size
    while len(out) < size:
        epoch, offset = divmod(position, n)
        take = min(size - len(out), n - offset)
        out += np.random.default_rng([seed, epoch]).permutation(n)[offset : offset + take].tolist()
        position += take
    return out


def shuffle_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that shuffles the candidates of ``step``'s examples."""
    return np.random.default_rng([seed, step, 1])


def run_loop(
    student: Student,
    examples: Sequence[Example] | Sequence[str],
    settings: LoopSettings,
    checkpoint: Path,
    *,
    resume: bool = False,
    desc: str = "training",
) -> TrainingLog:
    """Train ``student`` for ``settings.steps`` steps (from the checkpoint when ``resume``); saves every
    ``checkpoint_every`` steps and at the end into the folder ``checkpoint``."""
    import torch
    from tqdm import tqdm

    if not examples:
        raise ConfigError("no training examples: nothing to train on")
    params = student.trainable()
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    log = TrainingLog()
    if resume:
        log = load_checkpoint(checkpoint, params, optimizer, settings)
    autocast = compute_context(settings.dtype, str(getattr(student, "device", "cpu")))
    bar = tqdm(total=settings.steps, initial=log.step, desc=desc, unit="step", file=sys.stderr)
    with bar:
        while log.step < settings.steps:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(log.step)
            batch = [
                examples[i]
                for i in batch_indices(len(examples), log.step, settings.batch_size, settings.seed)
            ]
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(
                settings.seed * 1_000_003 + log.step
            )  # dropout, if any, depends on the step only
            with autocast:
                loss, parts = student.loss(batch, shuffle_rng(settings.seed, log.step))
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
            optimizer.step()
            log.step += 1
            log.losses.append(float(loss.detach()))
            for name, value in parts.items():
                log.parts.setdefault(name, []).append(value)
            log.examples_seen += len(batch)
            log.seconds += time.perf_counter() - started
            recent = log.losses[-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", ex_s=f"{log.examples_per_second:.2f}")
            bar.update(1)
            if log.step % settings.checkpoint_every == 0 or log.step == settings.steps:
                save_checkpoint(checkpoint, params, optimizer, log, settings)
    return log


def compute_context(dtype: str, device: str) -> Any:
    """The context a training step's forward runs in: bfloat16 autocast, or nothing for float32."""
    import contextlib

    import torch

    from streamrank.models import resolve_dtype

    if resolve_dtype(dtype, device) != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def save_checkpoint(
    folder: Path, params: dict[str, Any], optimizer: Any, log: TrainingLog, settings: LoopSettings
) -> None:
    """``state.pt``: trainable weights, optimizer state, the log so far and the settings (atomic)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "log": asdict(log),
        "settings": asdict(settings),
    }
    tmp = folder / f"{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def load_checkpoint(
    folder: Path, params: dict[str, Any], optimizer: Any, settings: LoopSettings
) -> TrainingLog:
    """Restore what :func:`save_checkpoint` wrote; a fresh log when there is none yet."""
    import torch

    path = folder / STATE_FILE
    if not path.exists():
        print(f"no checkpoint at {path}: starting at step 0", file=sys.stderr)
        return TrainingLog()
    state = torch.load(path, map_location="cpu", weights_only=False)
    keys = ("seed", "batch_size", "lr") + (("steps", "decay") if settings.decay != "constant" else ())
    for key in keys:
        if state["settings"].get(key, "constant" if key == "decay" else None) != getattr(settings, key):
            raise ConfigError(
                f"--resume: the checkpoint was trained with {key} = {state['settings'].get(key)}, "
                f"not {getattr(settings, key)}; use the same value or another --output"
            )
    if set(state["params"]) != set(params):
        raise ConfigError(f"--resume: the checkpoint at {path} holds other trainable weights than this run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    log = TrainingLog(**state["log"])
    log.resumed_from = log.step
    print(f"resumed from {path} at step {log.step}", file=sys.stderr)
    return log
