"""Backend dispatch for the low-rank operations: one entry point per operation.

Backends: ``"triton"`` (fused kernels), ``"torch"`` (streaming torch path), ``"unfused"``
(plain reference math), and ``"auto"``: Triton for CUDA tensors, streaming torch elsewhere.
Triton is imported only when a Triton backend actually runs. The Triton kernels are forward-only:
when autograd needs gradients through an operation, it runs on the streaming torch path instead.

:func:`trace` counts which implementation ran each operation (``("rank_space_attention", "torch")``,
``("llama_attention", "hf")`` for a patched attention that fell back to the model's own...), so tests
and benchmarks can assert that a model really ran on the fused path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

from . import reference, streaming
from .reference import Factors, HeadNorm, Rope

BACKENDS = ("auto", "triton", "torch", "unfused")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is known, else raise ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown low-rank backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for tensors on ``device``: ``auto`` becomes ``triton`` on CUDA, else ``torch``."""
    if check_backend(backend) == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return backend


_traces: list[Counter[tuple[str, str]]] = []


@contextmanager
def trace() -> Iterator[Counter[tuple[str, str]]]:
    """Count ``(operation, implementation)`` of every low-rank operation run inside the block."""
    counts: Counter[tuple[str, str]] = Counter()
    _traces.append(counts)
    try:
        yield counts
    finally:
        _traces.remove(counts)


def note(operation: str, implementation: str) -> None:
    """Record one run of ``operation`` by ``implementation`` in every active :func:`trace`."""
    for counts in _traces:
        counts[(operation, implementation)] += 1


def _triton():
    from . import triton_kernels

    return triton_kernels


def _choose(backend: str, x: torch.Tensor, *factors: Factors) -> str:
    chosen = resolve_backend(backend, x.device)
    if chosen == "triton" and torch.is_grad_enabled():
        tensors = [x, *(t for f in factors for t in f if t is not None)]
        if any(t.requires_grad for t in tensors):
            return "torch"  # kernels have no backward
    return chosen


def _module(chosen: str) -> ModuleType:
    """The module (triton_kernels, streaming or reference) that runs a ``chosen`` backend."""
    return {"triton": _triton, "torch": lambda: streaming, "unfused": lambda: reference}[chosen]()


def lowrank_linear(x: torch.Tensor, f: Factors, backend: str = "auto") -> torch.Tensor:
    """``(x V^T) U^T + b``; the streaming path equals the unfused one (the intermediate is only rank-wide)."""
    chosen = _choose(backend, x, f)
    note("lowrank_linear", chosen)
    if chosen == "triton":
        return _triton().lowrank_linear(x, f)
    return reference.lowrank_linear(x, f)


def lowrank_ffn(
    x: torch.Tensor,
    up: Factors,
    down: Factors,
    activation: str = "gelu",
    gate: Factors | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Low-rank FFN (GELU-style or SiLU-gated) on the chosen backend."""
    chosen = _choose(backend, x, up, down, *([gate] if gate is not None else []))
    note("lowrank_ffn", chosen)
    return _module(chosen).lowrank_ffn(x, up, down, activation, gate)


def lowrank_attention(
    x: torch.Tensor,
    q: Factors,
    k: Factors,
    v: Factors,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Low-rank self-attention context ``[B, S, H*D]`` on the chosen backend."""
    chosen = _choose(backend, x, q, k, v)
    note("lowrank_attention", chosen)
    return _module(chosen).lowrank_attention(x, q, k, v, num_heads, num_kv_heads, key_mask, causal, scale)


def rank_space_attention(
    pq: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    q: Factors,
    k: Factors,
    v: Factors,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    rope: Rope | None = None,
    backend: str = "auto",
    *,
    q_norm: HeadNorm | None = None,
    k_norm: HeadNorm | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decoder attention ``[B, S_q, H*D]`` from rank-space Q and cached rank-space K/V, on the chosen backend.

    ``q_norm`` / ``k_norm``: per-head RMSNorm before RoPE; ``window``: sliding window in cache indices.
    """
    chosen = _choose(backend, pq, q, k, v)
    if chosen == "triton" and (pk.requires_grad or pv.requires_grad) and torch.is_grad_enabled():
        chosen = "torch"
    note("rank_space_attention", chosen)
    if chosen == "triton":
        from . import triton_decoder

        impl: ModuleType = triton_decoder
    else:
        impl = _module(chosen)
    return impl.rank_space_attention(
        pq, pk, pv, q, k, v, num_heads, num_kv_heads, key_mask, causal, scale, q_pos, k_pos, rope,
        q_norm=q_norm, k_norm=k_norm, window=window,
    )  # fmt: skip
