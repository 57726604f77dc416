"""Attention: the one function every model in nanovlm calls.

    y = attention(q, k, v, causal=True)        # q: (B, T, Hq, D), k/v: (B, T, Hkv, D) -> (B, T, Hq, D)

Four backends compute the same thing:
  math   softmax(q k^T / sqrt(D) + mask) v written out, for reading and for tests
  sdpa   torch.nn.functional.scaled_dot_product_attention (fused kernels, GQA without copies)
  flex   torch's FlexAttention: packed samples as a block-sparse mask, never a T x T one (compiled on CUDA)
  flash  flash-attn 2 (CUDA, bf16/fp16 only), if it is installed
"auto" picks flash when it can run; else, for packed rows on CUDA, flex; else sdpa. The first time "auto"
makes a choice for a kind of call it prints it to stderr ("attention backend: flash (packed, cuda bfloat16)").

Tensors use the (batch, time, heads, head_dim) layout: it is what a Linear followed by .view() produces,
and what flash-attn wants; the other backends transpose internally.

Grouped-query attention (GQA): Hq is a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).

Packed samples. Several short samples can share one row to save the compute padding would waste. A row is
then cut into runs -- a sample, or a stretch of padding -- and a token sees only (earlier) tokens of its own
run: the score matrix is block-diagonal, so nothing leaks between samples packed together. Where the runs are
is worked out once per batch on the CPU, in `Packing` (data.collate and data.pack build it), not in every
layer on the device:
    position_ids  (B, T)  each token's index in its run (RoPE positions restart at each sample)
    cu_seqlens    (R+1,)  where each of the R runs starts when the rows are laid end to end, then B*T
    max_seqlen    int     the longest run
Laid end to end, the batch is one sequence of B*T tokens cut at cu_seqlens: exactly what flash-attn's varlen
kernel takes, with no gathering of real tokens (padding is one more run, whose outputs every caller ignores).
The other backends turn the same runs into a mask: flex into a block-sparse BlockMask (blocks of 128 x 128
that lie across two runs are skipped), sdpa and math into the plain (B, T, T) block-diagonal mask, the
readable reference. Padding before or between samples is a run too; padding after a row's only sample needs
nothing under causal attention (a real token never looks ahead), so such a batch runs as plain causal.

KV cache. For decoding, keys and values of earlier tokens are kept in a KVCache sized once, one slot per
(row, head, position). Each row has its own length, so prompts of different lengths decode together: prompts are
RIGHT-padded, the prefill writes every position, and `cache.advance(n_real)` sets each row's length to its
real token count, so the pad slots are overwritten by the first generated tokens. A new token of row b goes to
slot lengths[b] and sees slots 0..lengths[b]; with T new tokens, query i sees slots <= lengths[b] + i (the
causal mask aligned to the bottom right). Shapes never change while decoding (the mask covers all max_len
slots) and nothing is read back to the host, so a decode step can be captured whole (torch.compile, CUDA
graphs). flash-attn writes and attends in one call (flash_attn_with_kvcache).
"""

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "math", "sdpa", "flex", "flash")

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH = True
except ImportError:
    HAVE_FLASH = False

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    HAVE_FLEX = True
except ImportError:
    HAVE_FLEX = False

FLEX_BLOCK = 128   # FlexAttention's tile: a BlockMask says which 128 x 128 tiles of the score matrix to compute


@dataclass
class Packing:
    """Where the samples of a (B, T) batch are: see the module docstring. Build it with from_mask or
    from_lengths, on the CPU, once per batch; `.to(device)` moves it with the batch."""
    position_ids: torch.Tensor   # (B, T) long: index of each token in its run
    segment_ids: torch.Tensor    # (B, T) int32: the run of each token, numbered 0, 1, ... over the whole batch
    cu_seqlens: torch.Tensor     # (R + 1,) int32: run starts in the B*T tokens laid end to end, then B*T
    max_seqlen: int              # the longest run
    right_padded: bool           # every row is one sample then padding: causal attention needs no mask
    _flex_masks: dict = field(default_factory=dict, repr=False, compare=False)   # BlockMasks, built on first use

    @classmethod
    def from_mask(cls, attention_mask):
        """attention_mask (B, T): 0 = padding, otherwise the number of the sample a token belongs to (1, or
        True, for one sample per row; 1, 2, 3, ... for samples packed into a row, as data.pack writes it)."""
        m = attention_mask.detach().long().cpu()
        B, T = m.shape
        starts = torch.ones(B, T, dtype=torch.bool)
        starts[:, 1:] = m[:, 1:] != m[:, :-1]                   # a run starts where the sample number changes
        segment_ids = (starts.flatten().cumsum(0) - 1).view(B, T).int()
        cu_seqlens = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=B * T).int()
        t = torch.arange(T).expand(B, T)
        position_ids = t - torch.where(starts, t, 0).cummax(dim=1).values   # distance from the run's first token
        right_padded = bool((m <= 1).all() and (m[:, 1:] <= m[:, :-1]).all())
        return cls(position_ids, segment_ids, cu_seqlens, int(cu_seqlens.diff().max()), right_padded)

    @classmethod
    def from_lengths(cls, lengths):
        """One row made of consecutive segments of these lengths (a list or tensor), e.g. the images or windows of
        a vision tower's packed sequence. On the device of `lengths` (a CPU copy is made to count)."""
        device = lengths.device if torch.is_tensor(lengths) else "cpu"
        lengths = torch.as_tensor(lengths).cpu()
        mask = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), lengths)[None]   # (1, N)
        return cls.from_mask(mask).to(device)

    def to(self, device, non_blocking=False):
        return Packing(*(t.to(device, non_blocking=non_blocking) for t in
                         (self.position_ids, self.segment_ids, self.cu_seqlens)), self.max_seqlen, self.right_padded)

    def pin_memory(self):   # DataLoader(pin_memory=True) calls this on every batch element that has it
        return Packing(self.position_ids.pin_memory(), self.segment_ids.pin_memory(), self.cu_seqlens.pin_memory(),
                       self.max_seqlen, self.right_padded)

    def block_diagonal(self, causal):
        """(B, T, T) bool: query t may see key s. The dense mask, for the math and sdpa backends."""
        seg = self.segment_ids
        mask = seg[:, :, None] == seg[:, None, :]
        return mask.tril() if causal else mask

    def flex_mask(self, causal):
        """The BlockMask of the runs over the B*T tokens laid end to end, built once per batch (and kept)."""
        if causal not in self._flex_masks:
            self._flex_masks[causal] = flex_block_mask(self.segment_ids.flatten(), causal)
        return self._flex_masks[causal]

    def prepare_flex(self, causal):
        """Build the BlockMask now, if flex may run: a model calls this before its layers, so that layers compiled
        one by one (train_sft.py --compile) all find it built instead of each tracing its construction."""
        if HAVE_FLEX and not (causal and self.right_padded):
            self.flex_mask(causal)


def flex_block_mask(segment_ids, causal, block=FLEX_BLOCK):
    """A BlockMask for "same run (and causal)" from segment_ids (N,), numbered in order along the sequence.

    The runs are contiguous, so a tile of queries i and keys j needs computing only if their runs overlap, and
    needs no masking inside ("full") if one run covers both tiles. That is worked out per tile, (N/128)^2 of
    them, from the first and last run of each tile: no N x N mask is ever built."""
    N, device = segment_ids.numel(), segment_ids.device
    n = -(-N // block)
    starts = torch.arange(n, device=device) * block
    first, last = segment_ids[starts], segment_ids[(starts + block).clamp(max=N) - 1]      # (n,) runs per tile
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])       # (n, n) q tile, kv tile
    one_run = first == last
    full = one_run[:, None] & one_run[None, :] & (first[:, None] == first[None, :])
    if N % block:                                   # a ragged last tile is masked at its end
        full[-1, :] = full[:, -1] = False
    if causal:
        below = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        overlap &= below
        full &= below.tril(-1)                      # a diagonal tile is causal inside: never full
    partial = overlap & ~full

    def indices(sel):   # the selected kv tiles of each q tile first, in order
        return sel.sum(-1, dtype=torch.int32)[None, None], \
            torch.argsort(~sel, dim=-1, stable=True).to(torch.int32)[None, None]

    doc = segment_ids

    def mask_mod(b, h, q, kv):   # per score; indices past N (the last tile's tail) are clamped, then cut by flex
        same = doc[q.clamp(max=N - 1)] == doc[kv.clamp(max=N - 1)]
        return same & (q >= kv) if causal else same

    return BlockMask.from_kv_blocks(*indices(partial), *indices(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


class KVCache:
    """Keys and values for every layer, sized once: k[layer], v[layer] are (B, Hkv, max_len, D), heads first, the
    layout SDPA reads without copying (flash-attn reads the same memory as (B, max_len, Hkv, D), a view).

    lengths (B,) int32: tokens stored per row. A forward through the model calls begin(T) before its layers (the
    slots and positions of its T new tokens, and what they may see, computed once for all layers), the layers
    write and attend, then advance(n) adds each row's real new tokens. A token's position is its slot plus its
    row's `offset` (B,) (0, except after a Qwen2.5-VL prompt, whose images used fewer positions than tokens: the
    rope delta). A fresh cache is filled by a prefill (plain causal attention, right-padded prompts); every later
    forward appends. Appending past max_len is an IndexError (checking first would read the lengths back to the
    host every step): size the cache for the prompt plus every token to be generated."""

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_len, self.dtype = max_len, dtype
        self.offset = torch.zeros(batch_size, dtype=torch.int32, device=device)   # position - slot, per row
        self.fresh = True   # nothing written yet: the next forward is a prefill

    def begin(self, T):
        """Before the layers: the slots of the T new tokens, and the (B, T, max_len) mask of the slots each may see.
        Returns their positions (B, T): the slots plus the offset."""
        if self.fresh and T > self.max_len:
            raise ValueError(f"KV cache overflow: a prompt of {T} tokens > max_len {self.max_len}")
        self.slots = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)            # (B, T)
        if not self.fresh:   # a prefill needs no mask (see _cached)
            self.visible = torch.arange(self.max_len, device=self.lengths.device) <= self.slots[:, :, None]
        return self.slots + self.offset[:, None]

    def write(self, layer, k, v):
        """Store the new k, v (B, T, Hkv, D) at their slots."""
        K, V = self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)     # (B, max_len, Hkv, D) views
        if self.fresh:   # a prefill: slots 0..T-1 of every row
            K[:, :k.shape[1]] = k
            V[:, :v.shape[1]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]                            # (B, 1)
            K.index_put_((rows, self.slots), k.to(self.dtype))
            V.index_put_((rows, self.slots), v.to(self.dtype))

    def advance(self, n_new):
        """After the layers: n_new (an int or a (B,) tensor) real new tokens per row."""
        self.lengths += n_new
        self.fresh = False

    def repeat_interleave(self, n):
        """Each row n times in a row (r0, r0, ..., r1, ...): a prefilled prompt continued n ways."""
        new = KVCache(0, 0, self.max_len, 0, 0, self.dtype, self.lengths.device)
        new.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        new.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        new.lengths, new.fresh = self.lengths.repeat_interleave(n), self.fresh
        new.offset = self.offset.repeat_interleave(n)
        return new


# ---- choosing a backend -----------------------------------------------------------------------------------------

_announced = set()


def resolve_backend(backend, device, dtype, kind="plain"):
    """The backend that runs: `backend` itself, or for "auto" the fastest that can. kind: "plain" (no mask or
    causal only), "packed" (several runs per row) or "cache" (decoding)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    device = torch.device(device)
    flash_ok = HAVE_FLASH and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not flash_ok:
        why = "flash-attn is not installed" if not HAVE_FLASH else "flash-attn needs CUDA tensors in fp16/bf16"
        raise RuntimeError(f"attention backend 'flash' cannot run: {why} (got {device}, {dtype})")
    if backend == "flex" and not HAVE_FLEX:
        raise RuntimeError(f"attention backend 'flex' needs torch >= 2.5 (this is {torch.__version__})")
    if backend != "auto":
        return backend
    choice = "flash" if flash_ok else "flex" if kind == "packed" and device.type == "cuda" and HAVE_FLEX else "sdpa"
    if (choice, kind) not in _announced and not torch.compiler.is_compiling():
        _announced.add((choice, kind))
        if os.environ.get("RANK", "0") == "0":
            print(f"attention backend: {choice} ({kind}, {device.type} {str(dtype).replace('torch.', '')})",
                  file=sys.stderr)   # stderr: stdout is for results (sample.py prints the answer there)
    return choice


# ---- attention ----------------------------------------------------------------------------------------------------

def attention(q, k, v, *, causal, backend="auto", packing=None, cache=None, layer=None):
    """q: (B, T, Hq, D); k, v: (B, T, Hkv, D). Returns (B, T, Hq, D).

    packing: a Packing of the batch (samples packed into rows, or padding before a sample); None: every row is
    one sequence (causal attention also covers rows right-padded after their one sample).
    cache, layer: decode with a KVCache (causal only); k, v are the new tokens' and are written into it.
    """
    B, T, Hq, D = q.shape
    if Hq % k.shape[2]:
        raise ValueError(f"{Hq} query heads are not a multiple of {k.shape[2]} kv heads")
    if cache is not None:
        if packing is not None or not causal:
            raise ValueError("a KV cache decodes one right-padded prompt per row, causally (no packing)")
        return _cached(q, k, v, backend, cache, layer)
    if packing is not None and causal and packing.right_padded:
        packing = None   # padding after the row's only sample: no real token ever looks at it
    backend = resolve_backend(backend, q.device, q.dtype, "plain" if packing is None else "packed")

    if packing is None:
        if backend == "flash":
            return flash_attn_func(q, k, v, causal=causal)
        if backend == "math":
            return _math(q, k, v, causal=causal)
        return _sdpa(q, k, v, causal=causal)
    if backend == "flash":
        # The rows laid end to end are one sequence of B*T tokens; cu_seqlens cuts it into runs. A view: no copies.
        flat = lambda x: x.reshape(B * T, x.shape[2], D)                                   # noqa: E731
        y = flash_attn_varlen_func(flat(q), flat(k), flat(v), packing.cu_seqlens, packing.cu_seqlens,
                                   packing.max_seqlen, packing.max_seqlen, causal=causal)
        return y.view(B, T, Hq, D)
    if backend == "flex":
        return _flex(q, k, v, packing.flex_mask(causal))
    mask = packing.block_diagonal(causal)                                                  # (B, T, T)
    return _math(q, k, v, mask=mask) if backend == "math" else _sdpa(q, k, v, mask=mask)


def _cached(q, k, v, backend, cache, layer):
    """Attention of the T new tokens over the cache, after writing their k, v into it."""
    backend = resolve_backend(backend, q.device, q.dtype, "cache")
    if cache.fresh:   # the prefill: the prompt attends to itself, plain causal (right padding needs nothing)
        cache.write(layer, k, v)
        return attention(q, k, v, causal=True, backend=backend)
    K, V = cache.k[layer], cache.v[layer]                                                  # (B, Hkv, max_len, D)
    # flash_attn_with_kvcache appends k, v at cache_seqlens[b] in place and attends bottom-right causal. It is a
    # plain extension call, not a torch op, so a compiled decode step (CUDA graphs) uses SDPA's kernels instead.
    if backend == "flash" and not torch.compiler.is_compiling():
        return flash_attn_with_kvcache(q, K.transpose(1, 2), V.transpose(1, 2), k=k, v=v,
                                       cache_seqlens=cache.lengths, causal=True)
    cache.write(layer, k, v)
    q = q.to(K.dtype)
    if backend == "math":
        y = _math(q, K.transpose(1, 2), V.transpose(1, 2), mask=cache.visible)
    elif q.shape[1] == 1:
        # One new token (decoding): the G = Hq/Hkv query heads that share a kv head become G query rows of that
        # head, so the kernel reads the cache as it lies, never copying it for each query head.
        B, _, Hq, D = q.shape
        y = F.scaled_dot_product_attention(q.view(B, K.shape[1], -1, D), K, V,
                                           attn_mask=cache.visible[:, None]).reshape(B, 1, Hq, D)
    else:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=cache.visible[:, None],
                                           enable_gqa=True).transpose(1, 2)
    return y.to(v.dtype)


def _sdpa(q, k, v, causal=False, mask=None):
    """SDPA wants (B, H, T, D). mask: (B, T, S) bool (True = may attend) or None."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=None if mask is None else mask[:, None], is_causal=causal,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)                                                               # (B, T, Hq, D)


def _math(q, k, v, causal=False, mask=None):
    """The definition, written out. Scores and softmax in fp32 for stability. mask: (B, T, S) bool or None."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=2)                              # (B, S, Hq, D)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / D ** 0.5   # (B, Hq, T, S)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)  # (B, T, Hq, D)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    """FlexAttention over the rows laid end to end: (1, H, B*T, D), the runs kept apart by block_mask. On CUDA it
    runs compiled (one fused kernel that skips masked tiles); uncompiled, torch runs it unfused, for tests."""
    global _compiled_flex
    B, T, Hq, D = q.shape
    flex = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        flex = _compiled_flex
    flat = lambda x: x.reshape(1, B * T, x.shape[2], D).transpose(1, 2)                    # noqa: E731
    y = flex(flat(q), flat(k), flat(v), block_mask=block_mask, enable_gqa=Hq != k.shape[2])   # (1, Hq, B*T, D)
    return y.transpose(1, 2).reshape(B, T, Hq, D)
