"""SVD compression of a model's linear layers into :class:`LowRankLinear` factors.

Each weight ``W`` (``out x in``) becomes ``U = U_r sqrt(S_r)`` (``out x r``) and ``V = sqrt(S_r) Vh_r``
(``r x in``) from a truncated SVD, bias kept. The rank of a layer comes from either

- ``ratio``: the parameter budget, the same for every layer: ``r = floor(ratio * out * in / (out + in))``,
  so the factors hold about ``ratio`` times the dense parameters; or
- ``energy``: per layer, the smallest ``r`` whose singular values keep that share of ``sum(S^2)``.

Two decompositions:

- ``"svd"`` (plain): truncated SVD of ``W``; minimises ``||W - UV||_F``, blind to the inputs.
- ``"whitened"`` (activation-aware, SVD-LLM, Wang et al. 2024): given the Gram matrix
  ``G = X^T X`` of the layer's inputs over calibration data (:mod:`streamrank.kernels.calibrate`),
  ``L = cholesky(G + damping * mean(diag G) * I)``, then the truncated SVD of ``W L`` gives
  ``U = U_r Sigma_r`` and ``V = V_r^T L^{-1}`` (a triangular solve). This minimises the output error on the
  calibration inputs, ``||X W^T - X (UV)^T||_F``, and the error of dropping a singular value of ``W L`` is
  exactly that value (truncation-aware). ``energy`` then measures the singular values of ``W L``.

Either way the scale is split evenly between ``U`` and ``V`` (column norms of ``U`` equal row norms of
``V``), so both factors have the same range in half precision.

Targets are the attention and FFN projections of BERT encoders (``query/key/value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and Llama decoders
(``q/k/v/o_proj``, ``gate/up/down_proj``). Embeddings, poolers and LM heads are left dense.
A compressed model is saved as ``lowrank.safetensors`` (the factors) plus ``lowrank.json`` (ranks,
shapes and method) and restored onto a freshly loaded dense model with :func:`load_compressed`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import ops
from .reference import Factors

FORMAT = "streamrank-lowrank"
FORMAT_VERSION = 1
STATE_FILE = "lowrank.safetensors"
RANKS_FILE = "lowrank.json"
METHODS = ("svd", "whitened")
DAMPING = 0.01
"""Default damping of the whitening: ``damping * mean(diag(X^T X))`` is added to the diagonal."""

TARGET_PATTERN = re.compile(
    r"(?:^|\.)(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense"
    r"|layers?\.\d+\.output\.dense|self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$"
)


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b`` with ``U: [out, rank]``, ``V: [rank, in]``.

    ``backend`` (``"auto" | "triton" | "torch" | "unfused"``) picks the implementation; see
    :mod:`streamrank.kernels.ops`. Both torch backends compute the plain two-GEMM product.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.backend = "unfused"
        self.method = "svd"  # how the factors were computed ("svd" | "whitened"); saved with them

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        ratio: float | None = None,
        energy: float | None = None,
        gram: torch.Tensor | None = None,
        damping: float = DAMPING,
    ) -> LowRankLinear:
        """Factor ``linear``: at ``rank`` if given, else by ``energy``, else by ``ratio``, else full rank.

        With ``gram`` (``X^T X`` of the layer's inputs, ``[in, in]``) the factors come from the whitened
        SVD, otherwise from the plain SVD of the weight.
        """
        w = linear.weight.detach()
        decomposition = _Decomposition(w, gram, damping)
        if rank is None:
            if energy is not None:
                rank = rank_for_energy(decomposition.s, energy)
            elif ratio is not None:
                rank = rank_for_ratio(linear.out_features, linear.in_features, ratio)
            else:
                rank = len(decomposition.s)
        module = cls(
            linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype
        )
        module.set_factors(*decomposition.factors(rank), linear.bias)
        module.method = decomposition.method
        return module

    def set_factors(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy factors (and the bias, when this layer has one) into the parameters."""
        with torch.no_grad():
            self.U.copy_(U)
            self.V.copy_(V)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    def factors(self) -> Factors:
        return Factors(self.U, self.V, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lowrank_linear(x, self.factors(), self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, method={self.method}, backend={self.backend}"
        )


class _Decomposition:
    """SVD of ``W`` (plain) or of ``W L`` with ``L L^T = X^T X + damping`` (whitened), truncated on demand."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = DAMPING):
        self.dtype = weight.dtype
        self.method = "svd" if gram is None else "whitened"
        if gram is None:
            self.chol = None
            self.u, self.s, self.vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        else:
            # float64: L can be ill-conditioned, and the layers are small enough for it to be cheap.
            self.chol = whitening(gram.to(weight.device), damping)
            self.u, self.s, self.vh = torch.linalg.svd(
                weight.detach().double() @ self.chol, full_matrices=False
            )

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``U [out, rank]``, ``V [rank, in]`` in the weight's dtype, the scale split evenly between them."""
        if self.chol is None:
            U, V = _truncate(self.u, self.s, self.vh, rank)
        else:
            # V_r^T L^{-1}: solve Z L = V_r^T (L lower triangular) instead of inverting L.
            right = torch.linalg.solve_triangular(self.chol, self.vh[:rank], upper=False, left=False)
            U, V = _balance(self.u[:, :rank] * self.s[:rank], right)
        return U.to(self.dtype), V.to(self.dtype)


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _balance(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so that ``U[:, i].norm() == V[i].norm()`` (``U @ V`` unchanged)."""
    tiny = torch.finfo(U.dtype).tiny
    scale = (V.norm(dim=1).clamp_min(tiny) / U.norm(dim=0).clamp_min(tiny)).sqrt()
    return U * scale, V / scale[:, None]


def whitening(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower Cholesky factor ``L`` (float64) of ``gram + damping * mean(diag(gram)) * I``.

    The damping keeps ``L`` well conditioned when some input directions (almost) never occur in the
    calibration data; while the factorisation fails or a pivot is below ``1e-6`` of the mean scale, it
    is retried with ten times the damping (at least ``1e-6``), four times at most.
    """
    g = gram.detach().double()
    g = (g + g.T) / 2
    scale = g.diagonal().mean().item()
    scale = scale if scale > 0 else 1.0  # a layer that only ever saw zeros
    eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
    d = damping
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(g + d * scale * eye)
        if int(info) == 0 and chol.diagonal().min().item() ** 2 >= 1e-12 * scale:
            return chol
        d = max(d * 10, 1e-6)
    raise ValueError("the calibration Gram matrix is not positive definite even with damping")


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ~= U @ V`` with ``sqrt(S)`` folded into both factors (computed in float32)."""
    U, V = _truncate(*torch.linalg.svd(weight.detach().float(), full_matrices=False), rank)
    return U.to(weight.dtype), V.to(weight.dtype)


def whitened_factors(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD ``W ~= U @ V`` minimising ``||X W^T - X (UV)^T||`` for ``X^T X = gram``."""
    return _Decomposition(weight, gram, damping).factors(rank)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank whose factors hold ``ratio`` times the dense parameters (at least 1, at most full rank)."""
    r = int(ratio * out_features * in_features / (out_features + in_features))
    return max(1, min(r, out_features, in_features))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total ``sum(S^2)``."""
    sq = singular_values.double() ** 2
    kept = torch.cumsum(sq, 0) / sq.sum()
    return int(min(len(sq), int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1))


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The dense projections of ``model`` that compression replaces, by qualified name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and TARGET_PATTERN.search(name)
    }


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """The :class:`LowRankLinear` layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compress_model(
    model: nn.Module,
    ratio: float | None = 0.5,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
    damping: float = DAMPING,
) -> dict[str, int]:
    """Replace the target linear layers of ``model`` in place by SVD factors; return the rank per layer.

    ``ranks`` fixes the rank of named layers; the others get their rank from ``energy`` when it is
    given, else from ``ratio``. ``calibration`` maps each target layer's name (as in
    :func:`target_linears`) to the Gram matrix ``X^T X`` of its inputs
    (:func:`streamrank.kernels.calibrate.collect_grams`); the layers are then factored by the whitened
    SVD with ``damping``. A target layer missing from ``calibration`` raises ``KeyError``.
    """
    if ratio is None and energy is None and not ranks:
        raise ValueError("give ratio, energy or ranks")
    targets = target_linears(model)
    if not targets:
        raise ValueError(f"no BERT or Llama projection layers found in {type(model).__name__}")
    if calibration is not None:
        missing = [name for name in targets if name not in calibration]
        if missing:
            raise KeyError(
                f"no calibration statistics for {len(missing)} target layer(s), e.g. {missing[0]!r}: "
                "collect them on the same model (root module) that is compressed"
            )
    chosen: dict[str, int] = {}
    for name, linear in targets.items():
        gram = None if calibration is None else calibration[name]
        module = LowRankLinear.from_linear(
            linear, (ranks or {}).get(name), ratio=ratio, energy=energy, gram=gram, damping=damping
        )
        _replace(model, name, module)
        chosen[name] = module.rank
    return chosen


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Write the factors of every :class:`LowRankLinear` and a json of ranks/shapes into ``directory``."""
    from safetensors.torch import save_file

    layers = lowrank_layers(model)
    if not layers:
        raise ValueError("model has no LowRankLinear layers: compress it first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    meta = {}
    for name, m in layers.items():
        for key, t in m.state_dict().items():
            state[f"{name}.{key}"] = t.detach().cpu().contiguous()
        meta[name] = {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                      "bias": m.bias is not None, "method": m.method}  # fmt: skip
    save_file(state, str(out / STATE_FILE))
    (out / RANKS_FILE).write_text(
        json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "layers": meta}, indent=1) + "\n"
    )
    return out


def load_compressed(model: nn.Module, directory: str | Path) -> nn.Module:
    """Restore saved factors onto ``model`` (the dense architecture, as loaded) in place; return it.

    Layer names are relative to the module that was saved, so pass the same kind of root (for
    example the Hugging Face model, or the whole SentenceTransformer). The layers use the unfused
    backend; call ``apply_lowrank(model, backend=...)`` to switch to a fused one.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    info = json.loads((folder / RANKS_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / RANKS_FILE} is not a {FORMAT} file")
    state = load_file(str(folder / STATE_FILE))
    modules = dict(model.named_modules())
    for name, spec in info["layers"].items():
        current = modules.get(name)
        if not isinstance(current, nn.Linear | LowRankLinear):
            raise KeyError(f"saved layer {name!r} is not a linear layer of {type(model).__name__}")
        if (current.in_features, current.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"saved layer {name!r} has another shape than the model's")
        ref = current.U if isinstance(current, LowRankLinear) else current.weight
        module = LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], ref.device, ref.dtype
        )
        module.load_state_dict({key: state[f"{name}.{key}"] for key in module.state_dict()})
        module.method = spec.get("method", "svd")  # files written before whitening have no method
        _replace(model, name, module)
    return model
