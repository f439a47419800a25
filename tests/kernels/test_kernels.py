"""Triton kernels (CPU interpreter) and the streaming torch path against the torch reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from streamrank.eval.bench.kernels import peak_cpu_bytes  # noqa: E402
from streamrank.kernels import reference, streaming, triton_common, triton_kernels  # noqa: E402
from streamrank.kernels.reference import Factors  # noqa: E402

torch.set_num_threads(1)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def factors(
    out_f: int, in_f: int, rank: int, bias: bool = True, dtype=torch.float32, seed: int = 0
) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(
        (torch.randn(out_f, rank, generator=g) / rank**0.5).to(dtype),
        (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype),
        (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None,
    )


def as_fp32(f: Factors | None) -> Factors | None:
    return None if f is None else Factors(*(None if t is None else t.float() for t in f))


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    lengths = torch.linspace(seq, seq // 2, batch).long()
    return torch.arange(seq)[None, :] < lengths[:, None]


# ragged on purpose: tokens, rank, d_ff, sequence are not multiples of the 32-wide blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_lowrank_linear(dtype, bias):
    x = torch.randn(2, 25, 64).to(dtype)
    f = factors(72, 64, 20, bias, dtype)
    got = triton_kernels.lowrank_linear(x, f)
    want = reference.lowrank_linear(x.float(), as_fp32(f))
    assert got.dtype == dtype and got.shape == (2, 25, 72)
    assert (got.float() - want).abs().max() <= TOL[dtype]


@pytest.mark.parametrize(
    "activation, gated, dtype",
    [("gelu", False, torch.float32), ("silu", True, torch.float32), ("gelu_tanh", False, torch.float16)],
)
def test_triton_lowrank_ffn(activation, gated, dtype):
    x = torch.randn(50, 64).to(dtype)
    up, down = factors(80, 64, 20, dtype=dtype, seed=1), factors(64, 80, 24, dtype=dtype, seed=2)
    gate = factors(80, 64, 18, bias=False, dtype=dtype, seed=3) if gated else None
    got = triton_kernels.lowrank_ffn(x, up, down, activation, gate, block_f=32)
    want = reference.lowrank_ffn(x.float(), as_fp32(up), as_fp32(down), activation, as_fp32(gate))
    assert (got.float() - want).abs().max() <= TOL[dtype]


ATTENTION_CASES = [
    # heads, kv_heads, masked, causal, project_in_kernel, bias, dtype
    (2, 2, True, False, False, True, torch.float32),
    (2, 2, False, True, True, True, torch.float32),
    (4, 2, True, True, False, False, torch.float32),
    (2, 2, True, False, False, True, torch.float16),
]


@pytest.mark.parametrize("heads, kv_heads, masked, causal, project, bias, dtype", ATTENTION_CASES)
def test_triton_lowrank_attention(heads, kv_heads, masked, causal, project, bias, dtype):
    batch, seq, hidden = 2, 40, 64
    kv_width = hidden // heads * kv_heads
    x = torch.randn(batch, seq, hidden).to(dtype)
    q = factors(hidden, hidden, 24, bias, dtype, seed=1)
    k = factors(kv_width, hidden, 20, bias, dtype, seed=2)
    v = factors(kv_width, hidden, 22, bias, dtype, seed=3)
    mask = padding_mask(batch, seq) if masked else None
    got = triton_kernels.lowrank_attention(
        x, q, k, v, heads, kv_heads, mask, causal, project_in_kernel=project
    )
    want = reference.lowrank_attention(x.float(), *map(as_fp32, (q, k, v)), heads, kv_heads, mask, causal)
    assert got.shape == (batch, seq, hidden)
    assert (got.float() - want).abs().max() <= TOL[dtype]


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        triton_kernels.lowrank_linear(torch.randn(4, 8), factors(8, 8, 4))


def test_launch_retries_smaller_tiles_when_shared_memory_runs_out(monkeypatch):
    """A GPU with less shared memory than a large-rank tile needs gets smaller tiles, not an error."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class SharedMemoryBoundKernel:  # stands in for a compiled kernel: fits only with one stage
        fn = test_launch_retries_smaller_tiles_when_shared_memory_runs_out

        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta.get("num_stages", 3) > 1:
                    raise OutOfResources(303104, 232448, "shared memory")
                launched.append(meta)

            return launch

    monkeypatch.setattr(triton_common, "_fitting_tiles", {})
    kernel = SharedMemoryBoundKernel()
    triton_common._launch(kernel, (1,), "x", BLOCK_F=64, BLOCK_M=32)
    triton_common._launch(kernel, (1,), "x", BLOCK_F=64, BLOCK_M=32)
    assert launched == [{"BLOCK_F": 64, "BLOCK_M": 32, "num_stages": 1}] * 2
    assert list(triton_common._fitting_tiles.values()) == [{"num_stages": 1}]


def test_launch_raises_when_nothing_fits(monkeypatch):
    from triton.runtime.errors import OutOfResources

    class NeverFits:
        fn = test_launch_raises_when_nothing_fits

        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise OutOfResources(1 << 20, 232448, "shared memory")

            return launch

    monkeypatch.setattr(triton_common, "_fitting_tiles", {})
    with pytest.raises(OutOfResources):
        triton_common._launch(NeverFits(), (1,), BLOCK_F=64)


@pytest.mark.parametrize("gated", [False, True])
def test_streaming_ffn_equals_unfused(gated):
    x = torch.randn(3, 33, 48)
    up, down = factors(100, 48, 30, seed=1), factors(48, 100, 25, seed=2)
    gate = factors(100, 48, 28, seed=3) if gated else None
    act = "silu" if gated else "gelu"
    got = streaming.lowrank_ffn(x, up, down, act, gate, block_ff=32)
    assert (got - reference.lowrank_ffn(x, up, down, act, gate)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "heads, kv_heads, masked, causal", [(4, 4, True, False), (6, 2, True, True), (4, 1, False, True)]
)
def test_streaming_attention_equals_unfused(heads, kv_heads, masked, causal):
    batch, seq, hidden = 3, 45, 48
    kv_width = hidden // heads * kv_heads
    x = torch.randn(batch, seq, hidden)
    q, k, v = (
        factors(hidden, hidden, 20, seed=1),
        factors(kv_width, hidden, 12, seed=2),
        factors(kv_width, hidden, 14, seed=3),
    )
    mask = padding_mask(batch, seq) if masked else None
    got = streaming.lowrank_attention(x, q, k, v, heads, kv_heads, mask, causal, block_q=16, block_k=8)
    want = reference.lowrank_attention(x, q, k, v, heads, kv_heads, mask, causal)
    assert (got - want).abs().max() <= 1e-5


def test_streaming_saves_activation_memory():
    """The blocked path never holds a [tokens, d_ff] activation nor the full score matrix."""
    x = torch.randn(4, 256, 128)
    up, down = factors(1024, 128, 32, seed=1), factors(128, 1024, 32, seed=2)
    q, k, v = (factors(128, 128, 32, seed=s) for s in (3, 4, 5))
    mask = padding_mask(4, 256)
    with torch.inference_mode():
        ffn_ref = peak_cpu_bytes(lambda: reference.lowrank_ffn(x, up, down))
        ffn_stream = peak_cpu_bytes(lambda: streaming.lowrank_ffn(x, up, down, block_ff=128))
        attn_ref = peak_cpu_bytes(lambda: reference.lowrank_attention(x, q, k, v, 8, key_mask=mask))
        attn_stream = peak_cpu_bytes(
            lambda: streaming.lowrank_attention(x, q, k, v, 8, key_mask=mask, block_q=64, block_k=64)
        )
    tokens, d_ff, scores = 4 * 256, 1024, 4 * 8 * 256 * 256
    assert ffn_ref >= 2 * tokens * d_ff * 4  # pre-activation and activation, float32
    assert ffn_stream < tokens * d_ff * 4
    assert attn_ref >= scores * 4
    assert attn_stream < attn_ref / 3
