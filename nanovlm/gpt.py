"""A GPT-2 style decoder, small enough to train from scratch on a CPU (train_gpt.py).

Learned absolute positions, pre-LayerNorm blocks, GELU MLP, output head tied to the token embedding.
Attention goes through nanovlm.attention (the same core the VLM uses), including its KV cache for generation.

    model = GPT(GPTConfig(vocab_size=527))
    logits, loss = model(input_ids, targets)                 # (B, T, vocab); loss ignores targets == -100
    new = model.generate(prompt, max_new_tokens=3, temperature=0)                   # greedy
    new = model.generate(prompt, 20, temperature=0.8, top_k=50, top_p=0.95)        # top-k + nucleus
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.attention import KVCache, attention
from nanovlm.sampling import sample_next


@dataclass
class GPTConfig:
    vocab_size: int = 527          # digits: 15 special/label tokens + 512 codes
    block_size: int = 512          # longest sequence (learned positions)
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    attn_backend: str = "auto"     # auto | math | sdpa | flash


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.backend = config.n_head, config.attn_backend
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))    # (B, T, nh, hd)
        y = attention(q, k, v, causal=True, backend=self.backend, cache=cache, layer=layer)
        y = y.reshape(B, T, C)                                                           # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=None):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids. With a cache, the tokens continue each row at position cache.lengths[b]."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)[None]                              # (1, T)
        else:   # generate checks the length up front: no per-token read of the positions
            pos = cache.begin(T)                                                        # (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))                                    # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        logits = self.lm_head(self.ln_f(x))                                             # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, lengths=None,
                 eos_id=None, generator=None):
        """Continue prompts idx (B, T), right-padded to T with lengths (B,) real tokens (default: all T).

        Returns the new tokens (B, max_new_tokens); after a row emits eos_id it repeats eos_id.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed block_size {self.config.block_size}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=idx.device)
        c = self.config
        cache = KVCache(c.n_layer, B, T + max_new_tokens, c.n_head, c.n_embd // c.n_head,
                        dtype=self.wte.weight.dtype, device=idx.device)
        logits, _ = self(idx, cache=cache)                                              # (B, T, V) prefill
        cache.advance(lengths)  # pad slots get overwritten by the generated tokens
        logits = logits[torch.arange(B, device=idx.device), lengths - 1]                # (B, V) last real token
        out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator=generator)  # (B,) nanovlm/sampling.py
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            if len(out) == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, _ = self(nxt[:, None], cache=cache)                                 # (B, 1, V)
            cache.advance(1)
            logits = logits[:, -1]
        return torch.stack(out, 1)                                                      # (B, n_new)

