"""attention(): every backend against a loop-per-head reference written from the definition."""
import math

import pytest
import torch

from conftest import cuda
from nanovlm.attention import HAVE_FLASH, KVCache, attention


def reference(q, k, v, allowed):
    """Loop over batch and heads; allowed (B, T, S) bool. Float64."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = q[b, :, h].double() @ k[b, :, h // group].double().T / math.sqrt(D)   # (T, S)
            s = s.masked_fill(~allowed[b], float("-inf"))
            out[b, :, h] = s.softmax(-1) @ v[b, :, h // group].double()
    return out


def qkv(B=3, T=6, Hq=4, Hkv=2, D=8, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return (torch.randn(B, T, Hq, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
            torch.randn(B, S, Hkv, D, generator=g))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_matches_definition(backend, causal, Hq, Hkv):
    q, k, v = qkv(Hq=Hq, Hkv=Hkv)
    T = q.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    ref = reference(q, k, v, allowed.expand(q.shape[0], T, T))
    out = attention(q, k, v, causal=causal, backend=backend)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_padding_mask_left_and_right(backend):
    q, k, v = qkv(B=2, T=6)
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # left, right padded
    out = attention(q, k, v, causal=True, backend=backend, key_padding_mask=real)
    assert torch.isfinite(out).all()
    for b in range(2):  # each row's real tokens alone, causal, must give the same outputs
        idx = real[b].nonzero().squeeze(1)
        n = len(idx)
        ref = reference(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx], torch.ones(1, n, n, dtype=torch.bool).tril())
        assert (out[b, idx].double() - ref[0]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_equal_each_sample_alone(backend, causal):
    """Row 0 packs samples of 3, 2 and 1 tokens, row 1 one of 4 then padding: every sample's outputs equal
    attention over that sample alone (nothing leaks between samples), and padding stays finite."""
    q, k, v = qkv(B=2, T=6)
    seg = torch.tensor([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 0, 0]])
    out = attention(q, k, v, causal=causal, backend=backend, segment_ids=seg)
    assert torch.isfinite(out).all()
    for b, spans in [(0, [(0, 3), (3, 5), (5, 6)]), (1, [(0, 4)])]:
        for a, e in spans:
            n = e - a
            allowed = torch.ones(1, n, n, dtype=torch.bool)
            ref = reference(q[b:b + 1, a:e], k[b:b + 1, a:e], v[b:b + 1, a:e], allowed.tril() if causal else allowed)
            assert (out[b, a:e].double() - ref[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, causal=True, key_padding_mask=seg > 0, segment_ids=seg)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_ragged_batch_equals_full_attention(backend):
    """Prompts of lengths 5, 2, 4 right-padded to 5; prefill, then 3 decode steps; each row must equal
    plain causal attention over that row's own tokens."""
    B, Hq, Hkv, D, steps = 3, 4, 2, 8, 3
    lens = torch.tensor([5, 2, 4])
    q, k, v = qkv(B=B, T=5 + steps, Hq=Hq, Hkv=Hkv, D=D, seed=1)   # row b's token i is at index i
    cache = KVCache(1, B, 16, Hkv, D)
    pre = attention(q[:, :5], k[:, :5], v[:, :5], causal=True, backend=backend, cache=cache, layer=0)
    cache.advance(lens)
    outs = [[pre[b, i] for i in range(lens[b])] for b in range(B)]
    for s in range(steps):  # the next token of row b is its token number lens[b] + s
        pos = lens + s
        rows = torch.arange(B)
        y = attention(q[rows, pos][:, None], k[rows, pos][:, None], v[rows, pos][:, None],
                      causal=True, backend=backend, cache=cache, layer=0)
        cache.advance(1)
        for b in range(B):
            outs[b].append(y[b, 0])
    for b in range(B):
        n = int(lens[b]) + steps
        ref = reference(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], torch.ones(1, n, n, dtype=torch.bool).tril())
        assert (torch.stack(outs[b]).double() - ref[0]).abs().max() < 1e-5


def test_cache_overflow_is_an_error():
    q, k, v = qkv(B=1, T=4)
    cache = KVCache(1, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="overflow"):
        attention(q, k, v, causal=True, cache=cache, layer=0)


def test_unknown_and_unavailable_backends():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, causal=True, backend="xformers")
    if not HAVE_FLASH:
        with pytest.raises(RuntimeError, match="flash-attn is not installed"):
            attention(q, k, v, causal=True, backend="flash")


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="flash-attn is not installed")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_matches_sdpa_on_gpu(causal):
    q, k, v = (t.cuda().bfloat16() for t in qkv(B=2, T=64, Hq=8, Hkv=2, D=64))
    a = attention(q, k, v, causal=causal, backend="flash")
    b = attention(q, k, v, causal=causal, backend="sdpa")
    assert (a.float() - b.float()).abs().max() < 2e-2
    real = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    real[0, 50:] = False
    a = attention(q, k, v, causal=causal, backend="flash", key_padding_mask=real)
    b = attention(q, k, v, causal=causal, backend="sdpa", key_padding_mask=real)
    assert (a[real].float() - b[real].float()).abs().max() < 2e-2
    seg = torch.zeros(2, 64, dtype=torch.long, device="cuda")   # packed: 20 + 30 tokens, then padding; 64
    seg[0, :20], seg[0, 20:50], seg[1] = 1, 2, 1
    a = attention(q, k, v, causal=causal, backend="flash", segment_ids=seg)
    b = attention(q, k, v, causal=causal, backend="sdpa", segment_ids=seg)
    assert (a[seg > 0].float() - b[seg > 0].float()).abs().max() < 2e-2


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="flash-attn is not installed")
def test_flash_kv_cache_matches_sdpa_on_gpu():
    B, Hkv, D = 2, 2, 64
    q, k, v = (t.cuda().bfloat16() for t in qkv(B=B, T=9, Hq=8, Hkv=Hkv, D=D))
    outs = {}
    for backend in ("flash", "sdpa"):
        cache = KVCache(1, B, 32, Hkv, D, dtype=torch.bfloat16, device="cuda")
        a = attention(q[:, :6], k[:, :6], v[:, :6], causal=True, backend=backend, cache=cache, layer=0)
        cache.advance(torch.tensor([6, 4], device="cuda"))
        b = attention(q[:, 6:], k[:, 6:], v[:, 6:], causal=True, backend=backend, cache=cache, layer=0)
        outs[backend] = (a, b)
    assert (outs["flash"][1].float() - outs["sdpa"][1].float()).abs().max() < 2e-2
