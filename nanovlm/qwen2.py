"""Qwen2 / Qwen2.5 decoder-only language model, from scratch.

    model = Qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")   # or a local checkpoint directory
    logits = model(input_ids)                                      # (B, T) -> (B, T, vocab)

A stack of pre-norm blocks, x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x)), then a final RMSNorm and the
output head (tied to the token embedding in the small Qwen2.5 models). Attention uses rotary position
embeddings, grouped-query attention (few kv heads shared by many query heads) and, unusually, a bias on the
q/k/v projections. The MLP is SwiGLU: down(silu(gate(x)) * up(x)).

Numbers match transformers' Qwen2ForCausalLM to ~1e-6 in fp32 (tests/test_qwen2.py), which needs care in two
places: RMSNorm computes in fp32 and casts back before the weight, and the rotary frequencies are computed
in fp32 on the fly (not kept as a buffer that model.to(bfloat16) would round).
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.attention import Packing, attention
from nanovlm.chunked_ce import linear_cross_entropy
from nanovlm.weights import (config_dtype, load_mapped, read_config, read_safetensors, resolve_checkpoint,
                             save_mapped)


@dataclass
class Qwen2Config:
    # Field names follow the official config.json so the two read alike. Defaults: Qwen2.5-0.5B.
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0                 # 0: hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attn_backend: str = "auto"        # see nanovlm/attention.py

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf):
        """From an official config.json dict, as written by transformers 4.x (rope_theta) or 5.x (rope_parameters)."""
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        if hf.get("use_sliding_window"):
            raise NotImplementedError("sliding-window attention (use_sliding_window=true) is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {hf['hidden_act']!r}: Qwen2 uses silu")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names and v is not None}
        kw["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))  # 10000: transformers' default
        kw["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)          # False: transformers' default
        return cls(**kw)

    def to_hf(self, dtype=torch.float32):
        """An official config.json dict that transformers 4.x and 5.x both read."""
        hf = {k: v for k, v in asdict(self).items() if k != "attn_backend"}
        dtype = str(dtype).replace("torch.", "")
        hf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                  use_sliding_window=False, attention_dropout=0.0, initializer_range=0.02,
                  torch_dtype=dtype, dtype=dtype)
        return hf


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32: squaring bf16 activations loses the small ones; cast back *before* scaling, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos, sin (B, T, head_dim) for the split-halves rotary convention. Computed in fp32, then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                               / head_dim)                                          # (head_dim/2,)
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]              # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                         # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+D/2}) pair by its angle. x: (B, T, H, D); cos/sin: (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, packing=None, cache=None, layer=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)                   # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)                # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        # Under autocast v leaves its Linear in bf16 while the rotation by fp32 tables gives fp32 q, k: one dtype
        # at the attention call (flash-attn needs bf16 for all three; the KV cache holds one dtype).
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        y = attention(q, k, v, causal=True, backend=self.cfg.attn_backend,
                      packing=packing, cache=cache, layer=layer)                    # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, packing=None, cache=None, layer=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, packing, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Qwen2(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: the output head *is* the embedding matrix (no second parameter, nothing extra in the file).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # used when training from scratch; from_pretrained overwrites everything
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, packing=None, cache=None):
        """Final normed hidden states (B, T, hidden).

        input_ids (B, T) or inputs_embeds (B, T, hidden) (the VLM splices image features into these).
        packing: where the samples of the batch are (attention.Packing, built by data.collate / data.pack on the
        CPU): a token sees only its own sample, and positions count from 0 at each sample's first token, so a
        packed row computes what each sample would alone. Without it, attention_mask (B, T) says the same
        (0 = padding, 1, 2, 3, ... the samples of a row) and the Packing is built from it here, at the cost of
        one copy to the CPU. Neither: one sequence per row.
        cache: decode with a KVCache; prompts right-padded, one per row, attention_mask marking the real tokens
        (the cache advances by each row's real count; see nanovlm/attention.py).
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if cache is not None:
            if packing is not None or (attention_mask is not None and not Packing.from_mask(attention_mask).right_padded):
                raise ValueError("with a KV cache, prompts must be right-padded, one per row (attention_mask 1...1 0...0)")
            position_ids = cache.begin(T)                                            # (B, T) slots + offset
        else:
            if packing is None and attention_mask is not None:
                packing = Packing.from_mask(attention_mask).to(x.device)
            position_ids = torch.arange(T, device=x.device)[None].expand(B, T) if packing is None else \
                packing.position_ids
            if packing is not None and x.is_cuda:
                packing.prepare_flex(causal=True)   # here, once per batch, outside any compiled block
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, packing, cache, i)
        if cache is not None:
            cache.advance(T if attention_mask is None else (attention_mask > 0).sum(1))
        return self.norm(x)

    def logits(self, h):
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def head_loss(self, h, targets):
        """The cross-entropy of the head's logits at states h (N, hidden) against targets (N,), summed, fp32,
        without ever holding more than a chunk of the (N, vocab) logits (nanovlm/chunked_ce.py)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, (nn.Linear, nn.Embedding)):
            return linear_cross_entropy(h, head.weight, targets)
        return F.cross_entropy(self.logits(h).float(), targets, reduction="sum")   # a LoRA-wrapped head (lora.py)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, packing=None, cache=None):
        return self.logits(self.hidden_states(input_ids, inputs_embeds, attention_mask, packing, cache))

    # ---- official checkpoints -------------------------------------------------------------------------------

    def hf_key_map(self):
        """Our parameter names -> the official (transformers) names, spelled out."""
        m = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        for i in range(self.cfg.num_hidden_layers):
            hf = f"model.layers.{i}."
            for p in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                      "o_proj.weight"):
                m[f"layers.{i}.attn.{p}"] = hf + "self_attn." + p
            for p in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
                m[f"layers.{i}.mlp.{p}"] = hf + "mlp." + p
            m[f"layers.{i}.attn_norm.weight"] = hf + "input_layernorm.weight"
            m[f"layers.{i}.mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        if self.lm_head is not None:
            m["lm_head.weight"] = "lm_head.weight"
        return m

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, attn_backend="auto"):
        """Load an official Qwen2/Qwen2.5 checkpoint (a directory or a hub repo id). dtype None: float32."""
        ckpt = resolve_checkpoint(path_or_repo_id)
        cfg = Qwen2Config.from_hf(read_config(ckpt))
        cfg.attn_backend = attn_backend
        with torch.device("meta"):  # no time spent on a random init that the weights overwrite
            model = cls(cfg)
        # A tied checkpoint may still carry a copy of the head; it is the embedding, so skip it.
        ignore = [r"lm_head\.weight"] if cfg.tie_word_embeddings else []
        load_mapped(model, read_safetensors(ckpt), model.hf_key_map(), ckpt, ignore,
                    dtype=config_dtype(dtype) or torch.float32)
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_bytes=None):
        """Write config.json + safetensors with official names: transformers' from_pretrained reads them."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = self.embed_tokens.weight.dtype
        (out_dir / "config.json").write_text(json.dumps(self.cfg.to_hf(dtype), indent=2))
        save_mapped(self, self.hf_key_map(), out_dir, max_shard_bytes)
