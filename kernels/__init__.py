"""Fused low-rank kernels (FlashSVD-style): SVD-compressed layers, Triton kernels, torch reference paths.

Modules: ``svd`` (compression, ``LowRankLinear``, save/load), ``reference`` (plain torch math),
``streaming`` (blocked torch path for CPU), ``triton_kernels`` (fused linear, FFN and encoder
attention) and ``triton_decoder`` (decoder attention over rank-space K/V with RoPE), both on
``triton_common`` and imported only when used; ``ops`` (backend dispatch, ``trace``), ``lowrank``
(``apply_lowrank`` / ``LowRankSettings``, which also loads stored factors), ``decoder`` (Llama-family
attention on the fused path and the rank-space KV cache), ``calibrate`` (whitening statistics).
"""

from .lowrank import LowRankSettings, apply_lowrank, set_backend
from .svd import LowRankLinear, compress_model, load_compressed, save_compressed

__all__ = [
    "LowRankLinear",
    "LowRankSettings",
    "apply_lowrank",
    "compress_model",
    "load_compressed",
    "save_compressed",
    "set_backend",
]
