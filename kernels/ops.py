"""Backend dispatch for the low-rank operations: one entry point per operation.

Backends: ``"triton"`` (fused kernels), ``"torch"`` (streaming torch path), ``"unfused"``
(plain reference math), and ``"auto"``: Triton for CUDA tensors, streaming torch elsewhere.
Triton is imported only when a Triton backend actually runs. The Triton kernels are forward-only:
when autograd needs gradients through an operation, it runs on the streaming torch path instead.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference, streaming
from .reference import Factors

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


def _implementation(backend: str, x: torch.Tensor, *factors: Factors) -> ModuleType:
    """The module (triton_kernels, streaming or reference) that runs this call."""
    chosen = _choose(backend, x, *factors)
    return {"triton": _triton, "torch": lambda: streaming, "unfused": lambda: reference}[chosen]()


def lowrank_linear(x: torch.Tensor, f: Factors, backend: str = "auto") -> torch.Tensor:
    """``(x V^T) U^T + b``; the streaming path equals the unfused one (the intermediate is only rank-wide)."""
    if _choose(backend, x, f) == "triton":
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
    impl = _implementation(backend, x, up, down, *([gate] if gate is not None else []))
    return impl.lowrank_ffn(x, up, down, activation, gate)


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
    impl = _implementation(backend, x, q, k, v)
    return impl.lowrank_attention(x, q, k, v, num_heads, num_kv_heads, key_mask, causal, scale)
