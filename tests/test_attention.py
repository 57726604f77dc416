"""attention(): every backend against a loop-per-head reference written from the definition, with gradients;
Packing's metadata by hand; the KV cache; the backend choice."""
import math

import pytest
import torch

from conftest import cuda
from nanovlm import attention as attn
from nanovlm.attention import HAVE_FLASH, HAVE_FLEX, KVCache, Packing, attention, flex_block_mask, resolve_backend


def reference(q, k, v, allowed):
    """Loop over batch and heads; allowed (B, T, S) bool. Float64, differentiable."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    rows = []
    for b in range(B):
        heads = []
        for h in range(Hq):
            s = q[b, :, h].double() @ k[b, :, h // group].double().T / math.sqrt(D)   # (T, S)
            s = s.masked_fill(~allowed[b], float("-inf"))
            heads.append(s.softmax(-1) @ v[b, :, h // group].double())
        rows.append(torch.stack(heads, 1))
    return torch.stack(rows)                                                          # (B, T, Hq, D)


def qkv(B=3, T=6, Hq=4, Hkv=2, D=8, S=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    out = (torch.randn(B, T, Hq, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
           torch.randn(B, S, Hkv, D, generator=g))
    return tuple(t.requires_grad_(grad) for t in out)


def runs_alone(spans, T, causal):
    """The reference mask of rows cut into runs: spans[b] = [(start, end), ...] covering the row."""
    allowed = torch.zeros(len(spans), T, T, dtype=torch.bool)
    for b, row in enumerate(spans):
        for a, e in row:
            block = torch.ones(e - a, e - a, dtype=torch.bool)
            allowed[b, a:e, a:e] = block.tril() if causal else block
    return allowed


CPU_BACKENDS = ["math", "sdpa"] + (["flex"] if HAVE_FLEX else [])
# Uncompiled on the CPU, FlexAttention runs torch's unfused reference path and warns that it does.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


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


def test_packing_metadata_by_hand():
    """Row 0: samples of 3, 2, 1 tokens; row 1: padding, a sample of 3, padding. Laid end to end the runs are
    [0,3) [3,5) [5,6) | [6,7) [7,10) [10,12)."""
    p = Packing.from_mask(torch.tensor([[1, 1, 1, 2, 2, 3], [0, 1, 1, 1, 0, 0]]))
    assert p.cu_seqlens.tolist() == [0, 3, 5, 6, 7, 10, 12] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 3 and not p.right_padded
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]]
    assert p.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2], [3, 4, 4, 4, 5, 5]]
    right = Packing.from_mask(torch.tensor([[True, True, False], [True, True, True]]))
    assert right.right_padded and right.cu_seqlens.tolist() == [0, 2, 3, 6] and right.max_seqlen == 3
    one = Packing.from_lengths(torch.tensor([4, 1, 2]))                 # a vision tower's packed sequence
    assert one.cu_seqlens.tolist() == [0, 4, 5, 7] and one.position_ids.tolist() == [[0, 1, 2, 3, 0, 0, 1]]
    moved = p.to("cpu")
    assert torch.equal(moved.cu_seqlens, p.cu_seqlens) and moved.max_seqlen == 3
    if HAVE_FLEX:   # built once per batch, before the layers, and then found by each of them
        p.prepare_flex(causal=True)
        assert p.flex_mask(True) is p.flex_mask(True) and list(p._flex_masks) == [True]
        right.prepare_flex(causal=True)                                 # runs as plain causal: nothing to build
        assert not right._flex_masks


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_runs_equal_each_sample_alone_with_gradients(backend, causal):
    """Row 0 packs samples of 3, 2 and 1 tokens, row 1 padding, a sample of 3, padding: every sample's outputs
    (and the gradients of a loss on them) equal attention over that sample alone. flex runs forward only on
    the CPU (torch has no CPU backward for it): its gradients are checked on a GPU."""
    grad = backend != "flex"
    q, k, v = qkv(B=2, T=6, grad=grad)
    mask = torch.tensor([[1, 1, 1, 2, 2, 3], [0, 1, 1, 1, 0, 0]])
    spans = [[(0, 3), (3, 5), (5, 6)], [(0, 1), (1, 4), (4, 6)]]
    out = attention(q, k, v, causal=causal, backend=backend, packing=Packing.from_mask(mask))
    ref = reference(q, k, v, runs_alone(spans, 6, causal))
    real = mask > 0
    assert torch.isfinite(out).all() and (out[real].double() - ref[real]).abs().max() < 1e-5
    if grad:
        w = torch.randn(ref.shape, dtype=torch.float64) * real[..., None, None]   # a loss on the real tokens
        got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
        want = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for g, r in zip(got, want):
            assert (g.double() - r).abs().max() < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_right_padding_runs_as_plain_causal(backend):
    q, k, v = qkv(B=2, T=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    out = attention(q, k, v, causal=True, backend=backend, packing=Packing.from_mask(mask))
    ref = reference(q, k, v, runs_alone([[(0, 4), (4, 6)], [(0, 6)]], 6, True))
    assert (out[:, :4].double() - ref[:, :4]).abs().max() < 1e-5 and (out[1].double() - ref[1]).abs().max() < 1e-5


@pytest.mark.skipif(not HAVE_FLEX, reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("lengths", [[100, 150, 50], [300], [128, 128], [5, 250, 1, 60, 200], [129, 127, 256, 3]])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_equals_torchs_dense_construction(lengths, causal):
    """Our tile tables, built from the runs' ends, against create_block_mask, which evaluates the mask at every
    (query, key) pair: the same tiles computed, the same tiles full, the same mask inside."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc = Packing.from_lengths(lengths).segment_ids.flatten()
    N = doc.numel()

    def mask_mod(b, h, q, kv):
        same = doc[q] == doc[kv]
        return same & (q >= kv) if causal else same
    ours, ref = flex_block_mask(doc, causal), create_block_mask(mask_mod, None, None, N, N, device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks) and torch.equal(ours.full_kv_num_blocks,
                                                                             ref.full_kv_num_blocks)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_ragged_batch_equals_full_attention(backend):
    """Prompts of lengths 5, 2, 4 right-padded to 5; prefill, then 3 decode steps; each row must equal
    plain causal attention over that row's own tokens."""
    B, Hq, Hkv, D, steps = 3, 4, 2, 8, 3
    lens = torch.tensor([5, 2, 4])
    q, k, v = qkv(B=B, T=5 + steps, Hq=Hq, Hkv=Hkv, D=D, seed=1)   # row b's token i is at index i
    cache = KVCache(1, B, 16, Hkv, D)
    cache.begin(5)
    pre = attention(q[:, :5], k[:, :5], v[:, :5], causal=True, backend=backend, cache=cache, layer=0)
    cache.advance(lens)
    outs = [[pre[b, i] for i in range(lens[b])] for b in range(B)]
    for s in range(steps):  # the next token of row b is its token number lens[b] + s
        pos = lens + s
        rows = torch.arange(B)
        assert cache.begin(1)[:, 0].tolist() == pos.tolist()
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
        cache.begin(4)
    cache.begin(3)
    attention(q[:, :3], k[:, :3], v[:, :3], causal=True, cache=cache, layer=0)
    cache.advance(3)
    cache.begin(1)
    with pytest.raises(IndexError):                 # slot 3 of 3: past the end
        attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True, cache=cache, layer=0)


def test_unknown_and_unavailable_backends():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, causal=True, backend="xformers")
    if not HAVE_FLASH:
        with pytest.raises(RuntimeError, match="flash-attn is not installed"):
            attention(q, k, v, causal=True, backend="flash")


def test_auto_backend_choice_is_printed_once(monkeypatch, capsys):
    monkeypatch.setattr(attn, "_announced", set())
    bf16 = torch.bfloat16
    packed_gpu = "flash" if HAVE_FLASH else "flex" if HAVE_FLEX else "sdpa"
    assert resolve_backend("auto", "cuda", bf16, "packed") == packed_gpu
    assert resolve_backend("auto", "cuda", bf16, "packed") == packed_gpu
    assert resolve_backend("auto", "cuda", bf16, "plain") == ("flash" if HAVE_FLASH else "sdpa")
    assert resolve_backend("auto", "cuda", torch.float32, "cache") == "sdpa"   # flash-attn needs bf16/fp16
    assert resolve_backend("auto", "cpu", bf16, "packed") == "sdpa"
    assert resolve_backend("math", "cuda", bf16, "packed") == "math"           # asked for: not announced
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"attention backend: {packed_gpu} (packed, cuda bfloat16)"
    assert len(lines) == len(set(lines)) == 4


# ---- on a GPU -----------------------------------------------------------------------------------------------------

def gpu_packed_case(backend, causal):
    """bf16 on CUDA, packed rows (20 + 30 tokens, then padding; 64), GQA 8 -> 2: outputs and gradients of the real
    tokens against the math reference in fp32."""
    q, k, v = (t.cuda() for t in qkv(B=2, T=64, Hq=8, Hkv=2, D=64))
    mask = torch.zeros(2, 64, dtype=torch.long)
    mask[0, :20], mask[0, 20:50], mask[1] = 1, 2, 1
    packing = Packing.from_mask(mask).to("cuda")
    real = (mask > 0).cuda()
    w = torch.randn(2, 64, 8, 64, device="cuda") * real[..., None, None]
    grads = {}
    for name, dtype in ((backend, torch.bfloat16), ("math", torch.float32)):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*x, causal=causal, backend=name, packing=packing)
        (out.float() * w).sum().backward()
        grads[name] = (out.float(), [t.grad.float() for t in x])
    (a, ga), (b, gb) = grads[backend], grads["math"]
    assert (a[real] - b[real]).abs().max() < 3e-2
    for g, r in zip(ga, gb):
        assert (g - r).abs().max() < 5e-2 * max(1.0, r.abs().max().item())


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="flash-attn is not installed")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_varlen_matches_math_with_gradients_on_gpu(causal):
    gpu_packed_case("flash", causal)


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLEX, reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_math_with_gradients_on_gpu(causal):
    gpu_packed_case("flex", causal)


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="flash-attn is not installed")
def test_flash_kv_cache_matches_sdpa_on_gpu():
    B, Hkv, D = 2, 2, 64
    q, k, v = (t.cuda().bfloat16() for t in qkv(B=B, T=9, Hq=8, Hkv=Hkv, D=D))
    outs = {}
    for backend in ("flash", "sdpa"):
        cache = KVCache(1, B, 32, Hkv, D, dtype=torch.bfloat16, device="cuda")
        cache.begin(6)
        a = attention(q[:, :6], k[:, :6], v[:, :6], causal=True, backend=backend, cache=cache, layer=0)
        cache.advance(torch.tensor([6, 4], device="cuda"))
        cache.begin(3)
        b = attention(q[:, 6:], k[:, 6:], v[:, 6:], causal=True, backend=backend, cache=cache, layer=0)
        outs[backend] = (a, b)
    assert (outs["flash"][1].float() - outs["sdpa"][1].float()).abs().max() < 2e-2
