"""Fused low-rank kernels (FlashSVD-style): SVD-compressed layers, Triton kernels, torch reference paths.

Modules: ``svd`` (compression, ``LowRankLinear``, save/load), ``reference`` (plain torch math),
``streaming`` (blocked torch path for CPU), ``triton_kernels`` (fused kernels; imported only when
used), ``ops`` (backend dispatch), ``lowrank`` (``apply_lowrank`` / ``LowRankSettings``), ``bench``.
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
