"""Decoder attention over rank-space K/V (what the rank-space KV cache holds): the torch reference
against Hugging Face's RoPE + attention, the streaming path and the Triton kernel (CPU interpreter)
against the reference, on ragged lengths, grouped-query heads, rotary positions, cache appends, per-head
q/k RMSNorm and sliding windows (causal and bidirectional)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from streamrank.kernels import ops, reference, streaming, triton_decoder  # noqa: E402
from streamrank.kernels.reference import Factors, HeadNorm, Rope  # noqa: E402

torch.set_num_threads(1)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
HEAD_DIM = 16


def factors(out_f: int, in_f: int, rank: int, bias: bool, dtype=torch.float32, seed: int = 0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(
        (torch.randn(out_f, rank, generator=g) / rank**0.5).to(dtype),
        (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype),
        (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None,
    )


def rope() -> Rope:
    return Rope(1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)), 1.0)


def problem(heads: int, kv_heads: int, s_q: int, s_k: int, bias: bool = False, dtype=torch.float32):
    """Rank-space inputs for ``s_k`` keys whose last ``s_q`` are the queries; ragged ranks."""
    batch, hidden = 2, 48
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, s_k, hidden, generator=g).to(dtype)
    q = factors(heads * HEAD_DIM, hidden, 21, bias, dtype, seed=1)
    k = factors(kv_heads * HEAD_DIM, hidden, 13, bias, dtype, seed=2)
    v = factors(kv_heads * HEAD_DIM, hidden, 18, bias, dtype, seed=3)
    pq = reference.project(x[:, s_k - s_q :], q.V)
    pk, pv = reference.project(x, k.V), reference.project(x, v.V)
    # positions as in a left-padded batch: row 1 starts 5 tokens later; its pads are masked keys
    k_pos = torch.stack([torch.arange(s_k), (torch.arange(s_k) - 5).clamp(min=0)])
    key_mask = torch.ones(batch, s_k, dtype=torch.bool)
    key_mask[1, :5] = False
    return (pq, pk, pv, q, k, v), k_pos, key_mask


FEATURES = ["plain", "qk_norm+window"]


def features(name: str, window: int = 7) -> dict:
    """Keyword arguments of ``name``: none, or Qwen3/Gemma-style q/k norms and a sliding window."""
    if name == "plain":
        return {}
    g = torch.Generator().manual_seed(11)
    norm = lambda: HeadNorm(1 + 0.3 * torch.randn(HEAD_DIM, generator=g), 1e-6)  # noqa: E731
    return {"q_norm": norm(), "k_norm": norm(), "window": window}


def real(t: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Rows of real (not padding) queries: a padding query sees no key, and its row is arbitrary."""
    return t[key_mask[:, key_mask.shape[1] - t.shape[1] :]]


def fp32(args):
    return tuple(
        Factors(*(None if t is None else t.float() for t in a)) if isinstance(a, Factors) else a.float()
        for a in args
    )


def test_reference_matches_hugging_face_rope_attention():
    """Dense Q/K/V rebuilt from the factors, rotated by transformers' own RoPE: the same context."""
    heads, kv_heads, s = 4, 2, 11
    args, k_pos, key_mask = problem(heads, kv_heads, s, s, bias=True)
    pq, pk, pv, q, k, v = args
    got = reference.rank_space_attention(*args, heads, kv_heads, key_mask, True, None, k_pos, k_pos, rope())
    qh = reference.split_heads(reference.rebuild(pq, q.U, q.bias), heads)
    kh = reference.split_heads(reference.rebuild(pk, k.U, k.bias), kv_heads)
    cos, sin = reference.rope_tables(k_pos, rope())
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    want = reference.attention(
        reference.merge_heads(qh), reference.merge_heads(kh), reference.rebuild(pv, v.U, v.bias),
        heads, kv_heads, key_mask, causal=True,
    )  # fmt: skip
    assert (real(got, key_mask) - real(want, key_mask)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["unfused", "torch", "triton"])
def test_continuation_equals_the_last_rows_of_a_full_pass(backend):
    """Cache appends: queries after cached keys (bottom-right causal) give the full pass's last rows."""
    heads, kv_heads, s_k, s_q = 6, 2, 37, 9
    full_args, k_pos, key_mask = problem(heads, kv_heads, s_k, s_k)
    full = reference.rank_space_attention(
        *full_args, heads, kv_heads, key_mask, True, None, k_pos, k_pos, rope()
    )
    pq = full_args[0][:, s_k - s_q :]
    got = ops.rank_space_attention(
        pq, *full_args[1:], heads, kv_heads, key_mask, True, None, k_pos[:, s_k - s_q :], k_pos, rope(),
        backend=backend,
    )  # fmt: skip
    assert got.shape == (2, s_q, heads * HEAD_DIM)
    assert (got - full[:, s_k - s_q :]).abs().max() <= 1e-4


STREAMING_CASES = [
    # heads, kv_heads, s_q, s_k, masked, rope, bias
    (4, 4, 23, 23, True, True, True),
    (6, 2, 7, 45, True, True, False),
    (6, 3, 1, 30, False, True, False),  # one decoding step
    (4, 1, 19, 40, True, False, True),  # no rotary: plain causal attention over a cache
]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("heads, kv_heads, s_q, s_k, masked, with_rope, bias", STREAMING_CASES)
def test_streaming_equals_reference(heads, kv_heads, s_q, s_k, masked, with_rope, bias, feature):
    args, k_pos, key_mask = problem(heads, kv_heads, s_q, s_k, bias)
    mask = key_mask if masked else None
    positions = (k_pos[:, s_k - s_q :], k_pos, rope()) if with_rope else (None, None, None)
    extra = features(feature)
    want = reference.rank_space_attention(*args, heads, kv_heads, mask, True, None, *positions, **extra)
    got = streaming.rank_space_attention(
        *args, heads, kv_heads, mask, True, None, *positions, block_q=8, block_k=16, **extra
    )
    assert (real(got, key_mask) - real(want, key_mask)).abs().max() <= 1e-5


TRITON_CASES = [
    # heads, kv_heads, s_q, s_k, masked, rope, causal, bias, dtype
    (2, 2, 40, 40, True, True, True, True, torch.float32),  # prefill, ragged (40 = 32 + 8)
    (6, 2, 9, 45, True, True, True, False, torch.float32),  # continuation after a cache, GQA 3:1
    (6, 3, 1, 33, False, True, True, False, torch.float32),  # one decoding step
    (4, 2, 17, 17, True, False, False, True, torch.float32),  # no rotary, not causal
    (4, 2, 12, 40, True, True, True, True, torch.float16),
]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("heads, kv_heads, s_q, s_k, masked, with_rope, causal, bias, dtype", TRITON_CASES)
def test_triton_equals_reference(heads, kv_heads, s_q, s_k, masked, with_rope, causal, bias, dtype, feature):
    args, k_pos, key_mask = problem(heads, kv_heads, s_q, s_k, bias, dtype)
    mask = key_mask if masked else None
    positions = (k_pos[:, s_k - s_q :], k_pos, rope()) if with_rope else (None, None, None)
    extra = features(feature, window=20)  # wider than a 16-key block: blocks are skipped and masked
    got = triton_decoder.rank_space_attention(
        *args, heads, kv_heads, mask, causal, None, *positions, block_m=16, block_n=16, **extra
    )
    want = reference.rank_space_attention(
        *fp32(args), heads, kv_heads, mask, causal, None, *positions, **extra
    )
    assert got.dtype == dtype and got.shape == (2, s_q, heads * HEAD_DIM)
    assert (real(got.float(), key_mask) - real(want, key_mask)).abs().max() <= TOL[dtype]


def test_window_hides_keys_by_cache_index():
    """The reference's window against an explicit mask: causal keeps keys ``q - window < k <= q``,
    bidirectional ``|q - k| < window``."""
    args, _, _ = problem(2, 2, 10, 10)
    pq, pk, pv, q, k, v = args
    for causal in (True, False):
        got = reference.rank_space_attention(*args, 2, 2, None, causal, None, window=3)
        qh = reference.split_heads(reference.rebuild(pq, q.U), 2)
        kh = reference.split_heads(reference.rebuild(pk, k.U), 2)
        i = torch.arange(10)
        keep = (i[:, None] - i[None, :]).abs() < 3
        if causal:
            keep &= i[None, :] <= i[:, None]
        s = (qh @ kh.transpose(-1, -2) / HEAD_DIM**0.5).masked_fill(~keep, float("-inf"))
        want = reference.merge_heads(s.softmax(-1) @ reference.split_heads(reference.rebuild(pv, v.U), 2))
        assert (got - want).abs().max() <= 1e-5


def test_default_positions_are_the_key_indices():
    args, _, key_mask = problem(4, 2, 5, 20)
    implicit = triton_decoder.rank_space_attention(*args, 4, 2, key_mask, True, None, None, None, rope())
    explicit = reference.rank_space_attention(
        *args,
        4,
        2,
        key_mask,
        True,
        None,
        torch.arange(15, 20).expand(2, -1),
        torch.arange(20).expand(2, -1),
        rope(),
    )
    assert (real(implicit, key_mask) - real(explicit, key_mask)).abs().max() <= 1e-4


def test_more_queries_than_keys_is_an_error():
    args, _, _ = problem(2, 2, 4, 4)
    pq, pk, pv, q, k, v = args
    for fn in (
        reference.rank_space_attention,
        streaming.rank_space_attention,
        triton_decoder.rank_space_attention,
    ):
        with pytest.raises(ValueError, match="last keys"):
            fn(torch.cat([pq, pq], 1), pk, pv, q, k, v, 2)


def test_trace_counts_the_implementation_that_ran():
    args, _, _ = problem(2, 2, 4, 4)
    with ops.trace() as calls:
        ops.rank_space_attention(*args, 2, backend="torch")
        ops.rank_space_attention(*args, 2, backend="unfused")
    assert calls == {("rank_space_attention", "torch"): 1, ("rank_space_attention", "unfused"): 1}
