"""The vision-language model: SigLIP ViT -> projector -> Qwen2.5 decoder.

    vlm = VLM.from_pretrained("out/sft")                               # a checkpoint directory
    loss = vlm(input_ids, pixel_values, labels=labels)["loss"]          # training
    out = vlm.generate(prompts, pixel_values, n_images, max_new_tokens=32)  # sampling with a KV cache

How an image gets into a language model: the tokenizer writes `<|vision_start|>` + N x `<|image_pad|>` +
`<|vision_end|>` where the text said `<image>`. The VLM embeds the text as usual, runs each image through the
ViT and the projector to get N vectors of the LM's width, and writes them over the embeddings of the N pad
tokens, in order. From there the LM runs unchanged: to the decoder, image features are just tokens it did not
have to look up. Samples can hold any number of images, none included (text-only samples train too).

The loss is next-token cross-entropy on the positions whose label is not -100 (the assistant's answers).
Logits are computed only at those positions: the vocabulary projection is the largest matrix product in a
small LM and most positions (system prompt, image tokens, question) are never scored.

Numbers as values (optional, numeric.py): with cfg.numeric set, `<num>` tokens carry floats. embed() adds a
value embedding at each `<num>` (num_values: one float per `<num>` token of the batch, in reading order), the
loss adds alpha * the MSE of a regression head read at the position before each trained `<num>`, and
generate() feeds the head's value back in whenever it emits `<num>`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from nanovlm.attention import KVCache
from nanovlm.numeric import Numeric, NumericConfig, numeric_loss
from nanovlm.projector import Projector, ProjectorConfig
from nanovlm.qwen2 import Qwen2, Qwen2Config
from nanovlm.sampling import sample_next
from nanovlm.siglip import SiglipConfig, SiglipViT
from nanovlm.weights import config_dtype, load_mapped, read_config, read_safetensors


@dataclass
class VLMConfig:
    lm: Qwen2Config = field(default_factory=Qwen2Config)
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 151655       # <|image_pad|> in Qwen2.5's vocabulary
    stop_token_ids: tuple = (151645, 151643)  # <|im_end|>, <|endoftext|>
    pad_token_id: int = 151643
    image_size: int = 0                # input resolution; 0: the vision tower's own (positions interpolate)
    system_prompt: str = None          # the chat template's system turn the model was trained with (None: none)
    numeric: NumericConfig = None      # the numeric head (numeric.py); None: off, numbers are plain text

    def __post_init__(self):  # accept plain dicts (as read back from config.json)
        for name, cls in (("lm", Qwen2Config), ("vision", SiglipConfig), ("projector", ProjectorConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.image_size = self.image_size or self.vision.image_size
        self.projector.vision_hidden = self.vision.hidden_size
        self.projector.lm_hidden = self.lm.hidden_size
        self.projector.n_slots = self.image_tokens
        if isinstance(self.numeric, dict):
            self.numeric = NumericConfig(**self.numeric)
        if self.numeric is not None:
            self.numeric.lm_hidden = self.lm.hidden_size

    @property
    def image_tokens(self):
        """Tokens one image becomes in the LM sequence (196 patches / 2^2 = 49 for SigLIP-224)."""
        return (self.image_size // self.vision.patch_size) ** 2 // self.projector.shuffle_factor ** 2

    def to_dict(self):
        return {"model_type": "vlm", **asdict(self)}


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, lm=None, vision=None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else SiglipViT(cfg.vision)
        self.projector = Projector(cfg.projector)
        # Start the image tokens on the scale of the token embeddings (std 0.02, as the LM initialises them).
        # PyTorch's default Linear init makes them ~15x larger: their residual stream then drowns what each
        # layer adds, every image looks alike to the LM, and a model trained from scratch never learns to look.
        self.projector.apply(Qwen2._init_weights)
        self.lm = lm if lm is not None else Qwen2(cfg.lm)
        self.numeric = Numeric(cfg.numeric) if cfg.numeric is not None else None

    def enable_numeric(self, numeric_cfg: NumericConfig):
        """Add a fresh numeric head to a model trained without one (e.g. SFT from a pretrain checkpoint)."""
        self.cfg.numeric = numeric_cfg
        numeric_cfg.lm_hidden = self.cfg.lm.hidden_size
        w = self.lm.embed_tokens.weight
        self.numeric = Numeric(numeric_cfg).to(device=w.device, dtype=w.dtype)
        return self

    @classmethod
    def from_backbones(cls, lm_path, vision_path, projector=None, dtype=None, **cfg_kw):
        """Start from official checkpoints (dirs or hub ids), e.g. Qwen2.5-0.5B-Instruct + siglip-base-patch16-224.
        The projector is new (randomly initialised)."""
        lm = Qwen2.from_pretrained(lm_path, dtype=dtype)
        vision = SiglipViT.from_pretrained(vision_path, dtype=dtype)
        cfg = VLMConfig(lm=lm.cfg, vision=vision.cfg, projector=projector or ProjectorConfig(), **cfg_kw)
        model = cls(cfg, lm=lm, vision=vision)
        return model.to(lm.embed_tokens.weight.dtype).train()

    # ---- forward ------------------------------------------------------------------------------------------

    def image_features(self, pixel_values):
        """(N_img, 3, H, W) -> (N_img, image_tokens, lm_hidden)"""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids, pixel_values=None, where=None, num_values=None):
        """Token embeddings with image features written over the image-pad positions, and (numeric head on)
        value embeddings added at the <num> positions. (B, T) -> (B, T, C).
        num_values: (N,) floats, one per <num> token of input_ids in reading order (row by row)."""
        x = self.lm.embed_tokens(input_ids)                                   # (B, T, C)
        if self.numeric is not None:
            x = self.embed_values(x, input_ids, num_values, where)
        is_image = input_ids == self.cfg.image_token_id                       # (B, T)
        n_slots = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.cfg.image_tokens:
            per_row = is_image.sum(1).tolist()
            raise ValueError(
                f"image tokens do not match images{f' in {where}' if where else ''}: the text has {per_row} "
                f"image-pad tokens per row ({n_slots} in all) but {n_images} image(s) x {self.cfg.image_tokens} "
                f"tokens each = {n_images * self.cfg.image_tokens} (one <image> tag per image, never truncated)")
        if n_images:
            feats = self.image_features(pixel_values).to(x.dtype)             # (N_img, image_tokens, C)
            # Images fill the slots in reading order: row by row, left to right, as the tags appear.
            x = x.masked_scatter(is_image[..., None], feats.reshape(-1, x.shape[-1]))
        return x

    def embed_values(self, x, input_ids, num_values, where=None):
        """x (B, T, C) + the value embedding of each <num>'s value at its position."""
        is_num = input_ids == self.cfg.numeric.num_token_id                    # (B, T)
        values = torch.zeros(0) if num_values is None else torch.as_tensor(num_values)
        if int(is_num.sum()) != values.numel():
            raise ValueError(f"numbers do not match values{f' in {where}' if where else ''}: the text has "
                             f"{is_num.sum(1).tolist()} <num> tokens per row but {values.numel()} value(s) were given")
        ve = self.numeric.embed(values.to(x.device).reshape(-1)).to(x.dtype)  # (N, C)
        # Always computed, even for N = 0, so the value embedding is in the graph of every batch (DDP).
        return x.masked_scatter(is_num[..., None], x[is_num] + ve)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, where=None, num_values=None):
        """Returns {"loss", "n_tokens"} with labels (loss averaged over the labelled tokens), else {"logits"}.
        With the numeric head: {"loss" = token_ce + alpha * numeric_mse, "token_ce", "numeric_mse", "n_tokens",
        "n_numbers"}, or {"logits", "numeric"} (the head's raw values at every position, (B, T)) without labels."""
        x = self.embed(input_ids, pixel_values, where, num_values)
        h = self.lm.hidden_states(inputs_embeds=x, attention_mask=attention_mask)     # (B, T, C)
        if labels is None:
            out = {"logits": self.lm.logits(h)}
            if self.numeric is not None:
                out["numeric"] = self.numeric.decode(self.numeric.predict(h))          # (B, T)
            return out
        # Position t predicts token t+1: score only positions whose next token is labelled.
        targets = labels[:, 1:]                                                        # (B, T-1)
        keep = targets != -100
        logits = self.lm.logits(h[:, :-1][keep])                                       # (N, vocab)
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        n = keep.sum()
        out = {"loss": loss / n.clamp(min=1), "n_tokens": n}
        if self.numeric is not None:
            # The value of a trained <num> at t+1 is regressed from h[t], the state whose logits predict <num>.
            is_num = input_ids == self.cfg.numeric.num_token_id                        # (B, T)
            trained = is_num & (labels != -100)
            trained[:, 0] = False                                                      # nothing precedes it
            values = torch.as_tensor(num_values if num_values is not None else []).to(h.device).reshape(-1)
            mse = self.numeric.loss(h[:, :-1][trained[:, 1:]], values[trained[is_num]])  # (N_num, C), (N_num,)
            out.update(token_ce=out["loss"], numeric_mse=mse, n_numbers=trained.sum(),
                       loss=numeric_loss(out["loss"], mse, self.cfg.numeric.loss_weight))
        return out

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, pixel_values=None, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, generator=None, on_token=None, num_values=None, include_stop=False):
        """Sample continuations of a batch of prompts together, with a KV cache.

        prompts: list of token-id lists (lengths may differ; images as image-pad tokens, in order across the
        batch matching pixel_values). temperature 0 = greedy. Stops a row at any of cfg.stop_token_ids
        (the stop token is returned only with include_stop=True). on_token(row, token_id) is called as tokens are chosen (streaming).
        Returns a list of new-token lists.

        With the numeric head: num_values holds the values of the prompts' <num> tokens (reading order, as in
        embed), and each time a row emits <num> the head's value at that step is decoded, fed back through the
        value embedding with the <num> token, and recorded. Returns (new-token lists, predictions), where
        predictions[b] is a list of {"value": float, "position": index of that <num> in row b's new tokens};
        numeric.decode_numeric(tokenizer, tokens[b], predictions[b]) renders the text with <num><v>.
        """
        device = self.lm.embed_tokens.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.cfg.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):            # right padding: the cache keeps each row's length
            ids[b, :len(p)] = torch.tensor(p, device=device)
            mask[b, :len(p)] = True
        lm = self.lm.cfg
        cache = KVCache(lm.num_hidden_layers, B, T + max_new_tokens, lm.num_key_value_heads, lm.head_dim,
                        dtype=self.lm.embed_tokens.weight.dtype, device=device)
        x = self.embed(ids, pixel_values, num_values=num_values)
        h = self.lm.hidden_states(inputs_embeds=x, attention_mask=mask, cache=cache)           # (B, T, C)
        h = h[torch.arange(B, device=device), mask.sum(1) - 1]                               # (B, C) last real

        def next_logits(h):   # (B, C) -> (B, vocab). An image-pad token is never an output: images come from
            logits = self.lm.logits(h)   # pixels, and a sampled one would leave the text with an image too few
            logits[:, self.cfg.image_token_id] = float("-inf")
            return logits
        logits = next_logits(h)
        seen = ids.masked_fill(~mask, -1)                     # tokens for the repetition penalty
        out = [[] for _ in range(B)]
        preds = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = torch.tensor(self.cfg.stop_token_ids, device=device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)  # (B,)
            stopping = torch.isin(nxt, stops) & ~done
            if include_stop:   # the row's stop token is part of its output (GRPO trains it: learning to stop)
                for b in stopping.nonzero().flatten().tolist():
                    out[b].append(int(nxt[b]))
            done |= stopping
            if self.numeric is not None:   # the value of a <num> comes from the state that chose <num>
                t_val = self.numeric.predict(h).float()                                       # (B,)
                # Rounded to float32's ~7 significant digits, so the rendered text is short and exact.
                values = [float(f"{v:.7g}") for v in self.numeric.decode(t_val).tolist()]
            for b in (~done).nonzero().flatten().tolist():
                if self.numeric is not None and int(nxt[b]) == self.cfg.numeric.num_token_id:
                    preds[b].append({"value": values[b], "position": len(out[b])})
                out[b].append(int(nxt[b]))
                if on_token is not None:
                    on_token(b, int(nxt[b]))
            if done.all():
                break
            seen = torch.cat([seen, nxt[:, None]], 1)
            nxt = nxt.masked_fill(done, self.cfg.pad_token_id)  # finished rows run along, their output ignored
            x = self.lm.embed_tokens(nxt[:, None])                                               # (B, 1, C)
            if self.numeric is not None:   # feed the value back in, as training feeds in the true one
                is_num = nxt == self.cfg.numeric.num_token_id
                fed = torch.tensor(values, device=device)[is_num]
                x = self.embed_values(x, nxt[:, None], fed)
            h = self.lm.hidden_states(inputs_embeds=x, cache=cache)[:, -1]                      # (B, C)
            logits = next_logits(h)
        return out if self.numeric is None else (out, preds)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors (our parameter names). For atomic training checkpoints with the
        optimizer state, see train_utils.save_checkpoint, which calls this into a temporary directory."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype=None, attn_backend=None):
        ckpt_dir = Path(ckpt_dir)
        cfg = read_config(ckpt_dir)
        if cfg.get("model_type") != "vlm":
            raise ValueError(f"{ckpt_dir}/config.json has model_type {cfg.get('model_type')!r}, not 'vlm'")
        cfg = VLMConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        if attn_backend:
            cfg.lm.attn_backend = cfg.vision.attn_backend = attn_backend
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_safetensors(ckpt_dir)   # the same strict reader as the official checkpoints
        names = {k: k for k in model.state_dict()}
        return load_mapped(model, tensors, names, ckpt_dir, dtype=config_dtype(dtype) or torch.float32).eval()

