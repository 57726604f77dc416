"""Attention: the one function every model in nanovlm calls.

    y = attention(q, k, v, causal=True)        # q: (B, T, Hq, D), k/v: (B, S, Hkv, D) -> (B, T, Hq, D)

Three backends compute the same thing:
  math   softmax(q k^T / sqrt(D) + mask) v written out, for reading and for tests
  sdpa   torch.nn.functional.scaled_dot_product_attention (fused kernels, GQA without copies)
  flash  flash-attn 2 (CUDA, bf16/fp16 only), if it is installed
"auto" picks flash when it can run, else sdpa.

Tensors use the (batch, time, heads, head_dim) layout: it is what a Linear followed by .view() produces,
and what flash-attn wants; the other backends transpose internally.

Grouped-query attention (GQA): Hq is a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).

Masks. `causal` lets position t see positions <= t. `key_padding_mask` (B, S) bool marks real tokens (True)
so padding is never attended to; any padding layout works (left or right). A query row that would see
nothing (a pad query in left padding) is allowed to see itself, so no row is all -inf (softmax would be NaN);
those rows are padding and their outputs are ignored by every caller.

Packed samples. Several short samples can share one row to save the compute padding would waste:
`segment_ids` (B, T) int numbers them, 1, 2, 3, ... along the row, 0 for padding, each sample's tokens
contiguous. A token then sees only (earlier) tokens of its own sample: the score matrix is block-diagonal,
so nothing leaks between samples packed together.

KV cache. For decoding, keys and values of earlier tokens are kept in a pre-allocated KVCache, one slot per
(row, position). Each row has its own length, so prompts of different lengths decode together: prompts are
RIGHT-padded, the prefill writes every position, and `cache.advance(n_real)` sets each row's length to its
real token count, so the pad slots are overwritten by the first generated tokens. A new token of row b goes to
slot lengths[b] and sees slots 0..lengths[b]. With T new tokens the causal mask is aligned to the bottom
right of the (T, lengths[b] + T) score matrix: query i sees slots <= lengths[b] + i. SDPA's is_causal is
aligned to the top left, so with a cache we build the mask ourselves; flash-attn's causal is bottom-right
aligned and takes per-row cache lengths directly (flash_attn_with_kvcache).
"""

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "math", "sdpa", "flash")

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH = True
except ImportError:
    HAVE_FLASH = False


class KVCache:
    """Pre-allocated keys and values for every layer: k[layer], v[layer] are (B, max_len, Hkv, D)."""

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens stored per row
        self.max_len = max_len

    def advance(self, n_new):
        """Call once per forward, after all layers: n_new is an int or a (B,) tensor of real new tokens."""
        self.lengths += n_new if isinstance(n_new, int) else n_new.to(self.lengths)

    def write(self, layer, k, v):
        """Store k, v (B, T, Hkv, D) at slots lengths[b] + t of `layer`; return the slots in use."""
        B, T = k.shape[:2]
        if int(self.lengths.max()) + T > self.max_len:
            raise ValueError(f"KV cache overflow: {int(self.lengths.max())} + {T} tokens > max_len {self.max_len}")
        rows = torch.arange(B, device=k.device)[:, None]                                # (B, 1)
        slots = self.lengths[:, None] + torch.arange(T, device=k.device)[None, :]     # (B, T)
        self.k[layer][rows, slots] = k
        self.v[layer][rows, slots] = v
        used = int(self.lengths.max()) + T  # attend over the filled prefix only, not all max_len slots
        return self.k[layer][:, :used], self.v[layer][:, :used]                       # (B, S, Hkv, D)

    def mask(self, T, S):
        """(B, T, S) bool: query i of row b sees slot j iff j <= lengths[b] + i (bottom-right causal)."""
        q_pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return torch.arange(S, device=self.lengths.device)[None, None, :] <= q_pos[:, :, None]


def resolve_backend(backend, q):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    flash_ok = HAVE_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        return "flash" if flash_ok else "sdpa"
    if backend == "flash" and not flash_ok:
        why = "flash-attn is not installed" if not HAVE_FLASH else "flash-attn needs CUDA tensors in fp16/bf16"
        raise RuntimeError(f"attention backend 'flash' cannot run: {why} (got {q.device}, {q.dtype})")
    return backend


def attention(q, k, v, *, causal, backend="auto", key_padding_mask=None, segment_ids=None, cache=None, layer=None,
              scale=None):
    """q: (B, T, Hq, D); k, v: (B, T_kv, Hkv, D). Returns (B, T, Hq, D).

    key_padding_mask: (B, T_kv) bool, True = real token (not combined with a cache: the cache tracks lengths).
    segment_ids: (B, T) int, packed samples numbered 1, 2, ... along each row, 0 = padding (T_kv == T, no cache).
    cache, layer: decode with a KVCache; k, v are the new tokens' and are written into the cache first.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    if cache is not None and (key_padding_mask is not None or segment_ids is not None):
        raise ValueError("with a KV cache, padding is given by cache lengths (right padding), not by masks")
    if key_padding_mask is not None and segment_ids is not None:
        raise ValueError("give key_padding_mask or segment_ids, not both (a 0/1 padding mask is one segment per row)")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    backend = resolve_backend(backend, q)

    if backend == "flash":
        return _flash(q, k, v, causal, key_padding_mask, segment_ids, cache, layer, scale)

    # Build the boolean "may attend" mask (B, T, S), or None when plain causal / full attention suffices.
    mask = None
    if cache is not None:
        k, v = cache.write(layer, k, v)                                   # (B, S, Hkv, D)
        mask = cache.mask(T, k.shape[1]) if causal else None
        if not causal:  # non-causal over the cache: every filled slot up to this row's new end
            ends = cache.lengths + T
            mask = (torch.arange(k.shape[1], device=q.device)[None, :] < ends[:, None])[:, None, :].expand(B, T, -1)
    elif key_padding_mask is not None:
        S = k.shape[1]
        mask = key_padding_mask[:, None, :].expand(B, T, S)
        if causal:
            mask = mask & torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        # A query always sees its own position (query i sits at key slot i + S - T): no all-masked rows.
        mask = mask | (torch.arange(S, device=q.device)[None, :] == torch.arange(T, device=q.device)[:, None] + S - T)
    elif segment_ids is not None:
        if k.shape[1] != T:
            raise ValueError(f"segment_ids need queries and keys of the same length, got {T} and {k.shape[1]}")
        # Block-diagonal: query and key in the same sample, and that sample is not padding.
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)  # (B, T, T)
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = mask | torch.eye(T, dtype=torch.bool, device=q.device)  # pad queries see themselves: no NaN rows
    is_causal = causal and mask is None

    if backend == "sdpa":
        # SDPA wants (B, H, T, D); its is_causal is top-left aligned, fine here since T == S when used.
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=is_causal,
            scale=scale, enable_gqa=Hq != Hkv)
        return y.transpose(1, 2)                                           # (B, T, Hq, D)
    return _math(q, k, v, mask, is_causal, scale)


def _math(q, k, v, mask, is_causal, scale):
    """The definition, written out. Scores and softmax in fp32 for stability."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=2)                              # (B, S, Hq, D)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale  # (B, Hq, T, S)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)  # (B, T, Hq, D)


def _flash(q, k, v, causal, key_padding_mask, segment_ids, cache, layer, scale):
    """flash-attn 2, following its documented API (flash_attn_interface.py). GQA is native."""
    if cache is not None:
        # Appends k, v at cache_seqlens[b] in place and attends with bottom-right causal alignment.
        return flash_attn_with_kvcache(
            q, cache.k[layer], cache.v[layer], k=k, v=v,
            cache_seqlens=cache.lengths.to(torch.int32), softmax_scale=scale, causal=causal)
    if key_padding_mask is None and segment_ids is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    # Padding or packed samples: put the real tokens of every sample one after another in one sequence and
    # tell flash where each sample starts (a padding mask is one sample per row).
    B, T, Hq, D = q.shape
    if k.shape[1] != T:
        raise ValueError("flash backend with padding needs queries and keys of the same length")
    seg = key_padding_mask.long() if segment_ids is None else segment_ids.long()     # (B, T)
    idx = (seg > 0).flatten().nonzero().squeeze(1)                                    # (N_real,)
    # A sample is a run of one (row, segment) pair; the row number keeps equal ids of adjacent rows apart.
    sample = (torch.arange(B, device=seg.device)[:, None] * (int(seg.max()) + 1) + seg).flatten()[idx]
    lens = torch.unique_consecutive(sample, return_counts=True)[1].to(torch.int32)   # (N_samples,)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))                            # (N_samples + 1,)
    pack = lambda x: x.reshape(B * T, *x.shape[2:])[idx]                             # (N_real, H, D)
    y = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, int(lens.max()), int(lens.max()),
                               softmax_scale=scale, causal=causal)
    out = q.new_zeros(B * T, Hq, D)
    out[idx] = y
    return out.view(B, T, Hq, D)
