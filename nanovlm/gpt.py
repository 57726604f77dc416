"""A GPT-2 style decoder, small enough to train from scratch on a CPU (train_gpt.py).

Learned absolute positions, pre-LayerNorm blocks, GELU MLP, output head tied to the token embedding.
Attention goes through nanovlm.attention (the same core the VLM uses), including its KV cache for generation.

    model = GPT(GPTConfig(vocab_size=527))
    logits, loss = model(input_ids, targets)                 # (B, T, vocab); loss ignores targets == -100
    new = model.generate(prompt, max_new_tokens=3, temperature=0)                   # greedy
    new = model.generate(prompt, 20, temperature=0.8, top_k=50, top_p=0.95)        # top-k + nucleus
    model = GPT.from_checkpoint("out/gpt/last")          # a train_gpt.py checkpoint
    model.save_hf("out/gpt/hf")                          # the same network as transformers' GPT2LMHeadModel
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm import train_utils as tu
from nanovlm.attention import KVCache, attention
from nanovlm.sampling import sample_next
from nanovlm.weights import save_safetensors


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

    def to_hf(self, **token_ids):
        """The config.json of transformers' GPT2LMHeadModel for this network; token_ids: bos/eos/pad_token_id."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                "n_positions": self.block_size, "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
                "n_inner": 4 * self.n_embd, "activation_function": "gelu",  # F.gelu: exact, not GPT-2's tanh form
                "layer_norm_epsilon": 1e-5, "embd_pdrop": self.dropout, "resid_pdrop": self.dropout,
                "attn_pdrop": 0.0, "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
                "dtype": "float32", "torch_dtype": "float32", **token_ids}


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

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dropout=0.0):
        """Load a train_gpt.py checkpoint directory (config.json with model_type "gpt", model.safetensors)."""
        config = tu.read_config(path)
        if config.get("model_type") != "gpt":
            raise ValueError(f"{path} holds a {config.get('model_type')!r} checkpoint (config.json model_type), "
                             "not a GPT written by train_gpt.py")
        if not isinstance(config.get("gpt"), dict):
            raise ValueError(f"{path}/config.json: model_type 'gpt' but no \"gpt\" section with the model's shape")
        model = cls(GPTConfig(**{**config["gpt"], "dropout": dropout}))
        tu.load_checkpoint(path, model, device=device)
        return model.to(device)

    def save_hf(self, out_dir, **token_ids):
        """Write config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained reads.

        Same names under "transformer."; GPT-2's Conv1D layers store weights as (in, out), nn.Linear as
        (out, in), so those are transposed. The tied head is left out (tie_word_embeddings). GPT-2 always has
        biases: a bias=False model gets zeros, the same function. token_ids: bos/eos/pad_token_id for config.json.
        """
        tensors = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight":
                continue
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                t = t.t()                                                               # (out, in) -> (in, out)
            tensors["transformer." + name] = t.detach().float().contiguous().cpu()
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and name != "lm_head" and m.bias is None:
                tensors[f"transformer.{name}.bias"] = torch.zeros(m.weight.shape[0])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.config.to_hf(**token_ids), indent=2))
        save_safetensors(tensors, out_dir)

    def forward(self, idx, targets=None, cache=None, n_targets=None):
        """idx: (B, T) token ids. With a cache, the tokens continue each row at position cache.lengths[b].
        targets (B, T), -100 = not scored: the loss is the cross-entropy summed over the scored positions and
        divided by n_targets (default: their count here, the mean)."""
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
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
        # the mean over this batch's targets, or the sum over n_targets (the training loop passes the count of
        # the whole global batch, so that splitting a batch into micro-batches or processes changes nothing)
        return logits, loss / (n_targets if n_targets is not None else (targets != -100).sum().clamp(min=1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, lengths=None,
                 eos_id=None, generator=None):
        """Continue prompts idx (B, T), right-padded to T with lengths (B,) real tokens (default: all T).

        Returns the new tokens (B, max_new_tokens); after a row emits eos_id it repeats eos_id.
        """
        B, T = idx.shape
        if T + max_new_tokens - 1 > self.config.block_size:   # the last new token is never fed back in
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

