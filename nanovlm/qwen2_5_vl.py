"""Qwen2.5-VL, from scratch: a native-resolution ViT with 2-D RoPE and window attention, a 2x2 patch merger,
and the Qwen2.5 decoder with multimodal rotary positions (MRoPE).

    from nanovlm.qwen2_5_vl import Qwen25VL, preprocess_images
    pixel_values, grid_thw = preprocess_images(images, min_pixels=..., max_pixels=...)
    model = Qwen25VL.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")    # or a local directory; dtype= optional
    logits = model(input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw)   # (B, T, vocab)
    out = model.generate([prompt_ids], pixel_values, image_grid_thw=grid_thw, max_new_tokens=64)   # new-token lists

The pieces, each in its file:
- nanovlm/qwen2_5_vl_processor.py: images -> patches at (almost) native resolution (smart_resize).
- nanovlm/qwen2_5_vl_vision.py: the vision tower and the patch merger (our `projector`).
- nanovlm/qwen2.py: the decoder blocks, reused as they are.
- this file: MRoPE, the model (embedding, loss, generation) and the official checkpoint format.

Images in the text. An image of t x h x w patches becomes t*h*w / 4 LM tokens (`image_tokens`); the text holds
`<|vision_start|>` + that many `<|image_pad|>` + `<|vision_end|>`, and the merged features are written over
the pad tokens' embeddings in reading order (row by row, images in the order of image_grid_thw), as in the
SigLIP VLM (nanovlm/vlm.py). Unlike there, the count differs per image, so a dataset asks the model (or
qwen2_5_vl_processor.image_grid) how many pads to write.

MRoPE. The decoder's rotary embedding gets three position streams instead of one: time, row and column
(position_ids (3, B, T)). A text token has the same number in all three, counting on as in any LM. An image's
tokens all start at the position p where the image begins and add their own (frame, row, column): token
(i, j) of an image is at (p, p + i, p + j). The text after an image continues at p + max(rows, cols), one
past the largest position the image used, so a big image takes as much position room as its longest side,
not as its token count. The head's rotary frequencies are split in three (`mrope_section`, [16, 24, 24] of
the 64 for the real models): the fastest 16 turn with time, the next 24 with the row, the slowest 24 with
the column. For text the three streams agree and MRoPE is exactly the LM's 1-D RoPE.

Decoding. Each new token's position is its index in the row plus the row's "rope delta" (largest prompt
position + 1 - prompt length), since the prompt's images used fewer positions than tokens.

Numbers match transformers' Qwen2_5_VLForConditionalGeneration to ~1e-6 in fp32 (tests/test_qwen2_5_vl.py).
"""

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from nanovlm.attention import Packing
from nanovlm.qwen2 import Qwen2, Qwen2Config, rope_cos_sin
from nanovlm.qwen2_5_vl_processor import (MAX_PIXELS, MIN_PIXELS, Qwen25VLImages, image_grid,  # noqa: F401 (API)
                                           preprocess_images, smart_resize)
from nanovlm.qwen2_5_vl_vision import PatchMerger, VisionConfig, VisionTower
from nanovlm.vlm import VLM
from nanovlm.weights import config_dtype, load_mapped, read_config, read_safetensors, resolve_checkpoint, save_mapped

__all__ = ["Qwen25VL", "Qwen25VLConfig", "VisionConfig", "preprocess_images", "image_grid", "smart_resize",
           "mrope_positions", "mrope_cos_sin"]


QWEN_VL_SYSTEM = "You are a helpful assistant."   # the default system turn of Qwen2.5-VL's chat template
NANOVLM_FIELDS = {"min_pixels", "max_pixels", "system_prompt", "numeric", "stop_token_ids", "pad_token_id"}


def _qwen25vl_3b_lm():
    return Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=128000, tie_word_embeddings=True)


@dataclass
class Qwen25VLConfig:
    # Defaults: Qwen2.5-VL-3B-Instruct.
    lm: Qwen2Config = field(default_factory=_qwen25vl_3b_lm)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mrope_section: tuple = (16, 24, 24)    # rotary frequencies per stream (time, row, column); sums to head_dim/2
    image_token_id: int = 151655           # <|image_pad|>
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    stop_token_ids: tuple = (151645, 151643)   # <|im_end|>, <|endoftext|>
    pad_token_id: int = 151643
    # What a nanovlm training run adds (config.json keeps them under "nanovlm", with the stop and pad ids; the
    # hub's files have none): the image resolution range and system prompt it trained with, so sampling uses the
    # same, and a numeric head.
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    system_prompt: str = QWEN_VL_SYSTEM
    numeric: dict = None               # numeric.NumericConfig as a dict; None: no head

    def __post_init__(self):  # accept plain dicts (as read back from a training config)
        if isinstance(self.lm, dict):
            self.lm = Qwen2Config(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.mrope_section, self.stop_token_ids = tuple(self.mrope_section), tuple(self.stop_token_ids)
        if sum(self.mrope_section) != self.lm.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must add up to head_dim / 2 = "
                             f"{self.lm.head_dim // 2} (one entry per rotary frequency)")
        if self.vision.out_hidden_size != self.lm.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != LM hidden_size "
                             f"{self.lm.hidden_size}: the merger's output is the LM's input")

    @classmethod
    def from_hf(cls, hf, where="config.json"):
        """From an official config.json dict: the flat hub form (text fields at the top, `rope_scaling`
        {"type": "mrope", "mrope_section": [...]}, a nested vision_config) or transformers 5's nested
        text_config form (`rope_parameters`)."""
        if hf.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, not 'qwen2_5_vl' (Qwen2.5-VL)")
        if "vision_config" not in hf:
            raise ValueError(f"{where}: no vision_config")
        text = dict(hf.get("text_config") or hf)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError(f"{where}: the rope settings {rope} have no mrope_section")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("mrope", "default"):
            raise NotImplementedError(f"{where}: rope type {kind!r} is not supported")
        lm = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters", "head_dim")}
        lm["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1e6))}
        lm.setdefault("rms_norm_eps", 1e-5)   # transformers' Qwen2.5-VL default, when a file leaves it out
        # transformers 4.x kept tie_word_embeddings inside text_config, 5.x at the top: either one ties.
        lm["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        ids = {k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id") if hf.get(k) is not None}
        ours = hf.get("nanovlm", {})
        unknown = set(ours) - NANOVLM_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown nanovlm setting(s) {sorted(unknown)}")
        return cls(lm=Qwen2Config.from_hf(lm), vision=VisionConfig.from_hf(hf["vision_config"]),
                   mrope_section=tuple(rope["mrope_section"]), **ids, **ours)

    def to_hf(self, dtype=torch.float32):
        """The flat config.json of the hub checkpoints, which transformers 4.x and 5.x (and vLLM) read."""
        lm = self.lm
        dtype = str(dtype).replace("torch.", "")
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
            "num_hidden_layers": lm.num_hidden_layers, "num_attention_heads": lm.num_attention_heads,
            "num_key_value_heads": lm.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": lm.rms_norm_eps,
            "max_position_embeddings": lm.max_position_embeddings, "rope_theta": lm.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "tie_word_embeddings": lm.tie_word_embeddings, "use_sliding_window": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "bos_token_id": self.pad_token_id, "eos_token_id": self.stop_token_ids[0],
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "vision_config": self.vision.to_hf(), "torch_dtype": dtype, "dtype": dtype,
            "nanovlm": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "system_prompt": self.system_prompt,
                        "numeric": asdict(self.numeric) if is_dataclass(self.numeric) else self.numeric,
                        "stop_token_ids": list(self.stop_token_ids), "pad_token_id": self.pad_token_id},
        }

    def to_dict(self):
        """config.json of a training checkpoint: the hub's form, which transformers reads."""
        return self.to_hf()

    def image_tokens(self, grid_thw):
        """LM tokens per image: t*h*w / merge^2 for each row of grid_thw (n, 3). A list of ints."""
        return (torch.as_tensor(grid_thw).prod(-1) // self.vision.spatial_merge_size ** 2).tolist()


# ---- MRoPE -------------------------------------------------------------------------------------------------

def mrope_positions(input_ids, image_grid_thw, attention_mask, image_token_id, merge):
    """Position ids (3, B, T) for time, row and column, and each row's rope delta (B,), as transformers'
    get_rope_index computes them.

    attention_mask (B, T): 0 = padding (position 0), else the number of the sample a token belongs to
    (1 for one sample per row; 1, 2, ... when samples are packed into a row: each counts from 0).
    Images are taken from image_grid_thw in reading order; each run of image-pad tokens must hold whole images.
    delta: last sample's largest position + 1 - its length (decoding positions are index + delta)."""
    B, T = input_ids.shape
    ids = input_ids.cpu()
    seg = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask.long().cpu()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    positions = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    n_used = 0                                                        # images consumed so far
    for b in range(B):
        start = 0
        for sample, length in zip(*torch.unique_consecutive(seg[b], return_counts=True)):
            end, length = start + int(length), int(length)
            if sample > 0:
                chunks, p = [], 0
                flags, counts = torch.unique_consecutive(ids[b, start:end] == image_token_id, return_counts=True)
                for is_image, n in zip(flags.tolist(), counts.tolist()):
                    if not is_image:
                        chunks.append(torch.arange(p, p + n).expand(3, n))
                        p += n
                    while is_image and n > 0:                # a run of pads may hold several images back to back
                        if n_used == len(grids):
                            raise ValueError(f"row {b} has more image-pad tokens than image_grid_thw "
                                             f"({len(grids)} images) accounts for")
                        t, h, w = grids[n_used]
                        h, w = h // merge, w // merge
                        if t * h * w > n:
                            raise ValueError(f"row {b}: a run of {n} image-pad tokens ends inside image {n_used} "
                                             f"(grid {grids[n_used]} needs {t * h * w} tokens)")
                        tt, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                                        indexing="ij")
                        chunks.append(torch.stack([tt, rows, cols]).reshape(3, -1) + p)
                        p, n, n_used = p + max(h, w), n - t * h * w, n_used + 1
                pos = torch.cat(chunks, dim=1)                                                # (3, length)
                positions[:, b, start:end] = pos
                deltas[b] = pos.max() + 1 - length
            start = end
    if n_used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the text's image-pad tokens hold {n_used}")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def mrope_cos_sin(position_ids, head_dim, theta, section, dtype):
    """cos, sin (B, T, head_dim) for position_ids (3, B, T): frequency i of each half takes its angle from the
    stream that owns it (the first section[0] from time, the next section[1] from rows, the rest from columns)."""
    cos, sin = zip(*(rope_cos_sin(p, head_dim, theta, dtype) for p in position_ids))    # 3 x (B, T, D)
    stream = torch.repeat_interleave(torch.arange(3), torch.tensor(section)).repeat(2)  # (D,) owner of each dim
    index = stream.to(position_ids.device).expand(1, *position_ids.shape[1:], head_dim)  # (1, B, T, D)
    return torch.stack(cos).gather(0, index)[0], torch.stack(sin).gather(0, index)[0]


# ---- the model ---------------------------------------------------------------------------------------------

class Qwen25VL(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig, lm=None, vision=None, projector=None):
        """A new model (trained from scratch), or one made of given parts (numeric.py: from_vlm)."""
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else VisionTower(cfg.vision)
        self.projector = projector if projector is not None else PatchMerger(cfg.vision)   # the official `visual.merger`
        self.lm = lm if lm is not None else Qwen2(cfg.lm)
        if vision is None:   # for training from scratch; from_pretrained overwrites all
            self.vision.apply(Qwen2._init_weights)
        if projector is None:
            self.projector.apply(Qwen2._init_weights)

    # The loss and its token counts, and generation's hooks (the next token's logits, its input embedding, a
    # decoding step), are the SigLIP VLM's as they are: after the image features are in and the prompt's MRoPE
    # positions are in the cache (prefill), both models are the same Qwen2 decoder.
    outputs, loss_counts, vision_side_trains = VLM.outputs, VLM.loss_counts, VLM.vision_side_trains
    next_logits, step_embed, decode_step, compiled_decode_step = (VLM.next_logits, VLM.step_embed, VLM.decode_step,
                                                                   VLM.compiled_decode_step)

    def image_tokens(self, grid_thw):
        return self.cfg.image_tokens(grid_thw)

    def image_processor(self):
        """Images -> this model's inputs (pixel_values, image_grid_thw) and each image's token count, at the pixel
        range the model is set to (cfg.min_pixels, cfg.max_pixels)."""
        v = self.cfg.vision
        return Qwen25VLImages(self.cfg.min_pixels, self.cfg.max_pixels, v.patch_size, v.spatial_merge_size,
                              v.temporal_patch_size)

    def image_features(self, pixel_values, image_grid_thw):
        """(N_patches, C*T*p*p) -> (sum of image_tokens, lm hidden), images one after another."""
        return self.projector(self.vision(pixel_values, image_grid_thw))

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, where=None):
        """Token embeddings with the image features written over the image-pad tokens. (B, T) -> (B, T, C)."""
        x = self.lm.embed_tokens(input_ids)                                                # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("give pixel_values and image_grid_thw together (both from preprocess_images)")
        per_image = [] if image_grid_thw is None else self.image_tokens(image_grid_thw)
        if int(is_image.sum()) != sum(per_image):
            raise ValueError(
                f"image tokens do not match images{f' in {where}' if where else ''}: the text has "
                f"{is_image.sum(1).tolist()} image-pad tokens per row ({int(is_image.sum())} in all) but "
                f"image_grid_thw gives {per_image} tokens per image ({sum(per_image)} in all)")
        if per_image:
            feats = self.image_features(pixel_values, image_grid_thw).to(x.dtype)         # (sum, C)
            x = x.masked_scatter(is_image[..., None], feats)
        elif isinstance(self, FSDPModule) or (torch.is_grad_enabled() and self.vision_side_trains()):
            # No images: a blank one of the smallest size (one merged token) runs through the vision side and
            # counts zero times, as in VLM.embed (why: there).
            v = self.cfg.vision
            m = v.spatial_merge_size
            blank = x.new_zeros(m * m, 3 * v.temporal_patch_size * v.patch_size ** 2)        # (m*m, 1176)
            grid = torch.tensor([[1, m, m]], device=x.device)
            x = x + 0 * self.image_features(blank, grid).sum().to(x.dtype)
        return x

    def positions(self, input_ids, image_grid_thw=None, attention_mask=None):
        """MRoPE position ids (3, B, T) and rope deltas (B,); see mrope_positions."""
        return mrope_positions(input_ids, image_grid_thw, attention_mask, self.cfg.image_token_id,
                               self.cfg.vision.spatial_merge_size)

    def hidden_states(self, inputs_embeds, position_ids, attention_mask=None, cache=None, packing=None):
        """The decoder (nanovlm/qwen2.py's blocks) with MRoPE: (B, T, C), (3, B, T) -> final normed (B, T, C).
        attention_mask, packing and cache as in Qwen2.hidden_states (0 = padding, 1, 2, ... packed samples)."""
        x, lm = inputs_embeds, self.cfg.lm
        T = x.shape[1]
        if cache is not None:
            if packing is not None or (attention_mask is not None and not Packing.from_mask(attention_mask).right_padded):
                raise ValueError("with a KV cache, prompts must be right-padded, one per row (attention_mask 1...1 0...0)")
            cache.begin(T)                         # the slots of the new tokens (their positions are MRoPE's)
        elif packing is None and attention_mask is not None:
            packing = Packing.from_mask(attention_mask).to(x.device)
        if packing is not None and x.is_cuda:
            packing.prepare_flex(causal=True)      # once per batch, outside any compiled block
        cos, sin = mrope_cos_sin(position_ids, lm.head_dim, lm.rope_theta, self.cfg.mrope_section, x.dtype)
        for i, layer in enumerate(self.lm.layers):
            x = layer(x, cos, sin, packing, cache, i)
        if cache is not None:
            cache.advance(T if attention_mask is None else (attention_mask > 0).sum(1))
        return self.lm.norm(x)

    def states(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, packing=None,
               where=None, **embed_kw):
        """A batch through the model: the final normed states (B, T, C) the head reads. embed_kw goes to embed()
        (numeric.NumericQwen25VL: num_values)."""
        x = self.embed(input_ids, pixel_values, image_grid_thw, where=where, **embed_kw)
        position_ids, _ = self.positions(input_ids, image_grid_thw, attention_mask)
        return self.hidden_states(x, position_ids, attention_mask, packing=packing)        # (B, T, C)

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, labels=None,
                n_label_tokens=None, packing=None, where=None):
        """Logits (B, T, vocab); with labels, {"loss", "n_tokens"} instead, the logits computed only where a label
        is scored, the loss divided by n_label_tokens (default: this batch's count), as VLM.forward."""
        h = self.states(input_ids, pixel_values, image_grid_thw, attention_mask, packing, where)
        return self.lm.logits(h) if labels is None else self.outputs(h, labels, n_label_tokens)

    # ---- generation ---------------------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, image_grid_thw=None, **embed_kw):
        """The prompts (right-padded, attention_mask 1...1 0...0) into a fresh KVCache with MRoPE positions:
        -> final states (B, T, C). Sets the cache's offsets to the rope deltas, so every later token, text, is at
        position slot + delta, where MRoPE is the LM's own 1-D RoPE (the three streams agree): from here on the
        plain decoder with the cache computes Qwen2.5-VL (VLM.decode_step, grpo's completion pass)."""
        x = self.embed(input_ids, pixel_values, image_grid_thw, **embed_kw)
        position_ids, deltas = self.positions(input_ids, image_grid_thw, attention_mask)
        h = self.hidden_states(x, position_ids, attention_mask, cache)
        cache.offset = deltas.to(cache.offset)
        return h

    # Generation is VLM.generate as it is (image_grid_thw goes with embed_kw to prefill above).
    generate = VLM.generate

    # ---- official checkpoints -------------------------------------------------------------------------------

    def hf_key_map(self):
        """Our parameter names -> the official hub names (`model.*` text, `visual.*` vision, `lm_head`)."""
        m = {f"lm.{k}": v for k, v in self.lm.hf_key_map().items()}
        m["vision.patch_embed.proj.weight"] = "visual.patch_embed.proj.weight"
        for i in range(self.cfg.vision.depth):
            for p in ("norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                      "attn.proj.bias", "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
                      "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"):
                m[f"vision.layers.{i}.{p}"] = f"visual.blocks.{i}.{p}"
        m["projector.ln_q.weight"] = "visual.merger.ln_q.weight"
        for ours, official in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
            for p in ("weight", "bias"):
                m[f"projector.{ours}.{p}"] = f"visual.merger.{official}.{p}"
        # What the hub has no place for (the numeric head) keeps our names: transformers skips those tensors.
        m.update({k: k for k in self.state_dict() if k.split(".")[0] not in ("lm", "vision", "projector")})
        return m

    @staticmethod
    def hub_layout(tensors):
        """The hub's key names for a checkpoint in either layout: transformers 4.5x's save_pretrained wrote
        `model.language_model.*` and `model.visual.*`, the hub files (and transformers 5) `model.*` and `visual.*`."""
        renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
        out = {}
        for k, t in tensors.items():
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            if k in out:
                raise ValueError(f"checkpoint holds {k!r} in both key layouts")
            out[k] = t
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, attn_backend="auto"):
        """Load an official Qwen2.5-VL checkpoint (a directory or a hub repo id), or a training run's (the same
        layout; one with a numeric head loads as numeric.NumericQwen25VL). dtype None: float32."""
        ckpt = resolve_checkpoint(path_or_repo_id)
        cfg = Qwen25VLConfig.from_hf(read_config(ckpt), where=ckpt / "config.json")
        cfg.lm.attn_backend = cfg.vision.attn_backend = attn_backend
        if cfg.numeric is not None and cls is Qwen25VL:
            from nanovlm.numeric import NumericQwen25VL
            cls = NumericQwen25VL
        with torch.device("meta"):  # no time spent on a random init that the weights overwrite
            model = cls(cfg)
        # A tied checkpoint may still carry a copy of the head; it is the embedding, so skip it.
        ignore = [r"lm_head\.weight"] if cfg.lm.tie_word_embeddings else []
        load_mapped(model, cls.hub_layout(read_safetensors(ckpt)), model.hf_key_map(), ckpt, ignore,
                    dtype=config_dtype(dtype) or torch.float32)
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_bytes=None):
        """config.json + safetensors in the hub layout: transformers (and so vLLM) load it unchanged.
        A model with LoRA adapters must be merged first (nanovlm.lora.merge_lora)."""
        if any(n.endswith("lora_A") for n, _ in self.named_parameters()):
            raise ValueError("the model has LoRA adapters: merge them first (nanovlm.lora.merge_lora(model)), "
                             "the official format has no place for them")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = self.lm.embed_tokens.weight.dtype
        (out_dir / "config.json").write_text(json.dumps(self.cfg.to_hf(dtype), indent=2))
        save_mapped(self, self.hf_key_map(), out_dir, max_shard_bytes)
