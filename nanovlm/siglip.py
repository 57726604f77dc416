"""SigLIP vision tower (a ViT), from scratch, plus the image preprocessing it was trained with.

    vit = SiglipViT.from_pretrained("google/siglip-base-patch16-224")
    pixels = preprocess_image(Image.open("cat.jpg"), 224)[None]   # (1, 3, 224, 224)
    feats = vit(pixels)                                            # (1, 196, 768): one vector per 16x16 patch

An image is cut into patches by a strided convolution (one patch = one token), a learned position embedding
is added, then pre-LN transformer blocks (bidirectional attention with biases, tanh-GELU MLP) and a final
LayerNorm. There is no CLS token: SigLIP pools with a separate attention head for its contrastive loss, and
a VLM wants every patch anyway, so the pooling head is not part of this module (its weights are skipped).
"""

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from nanovlm.attention import attention
from nanovlm.weights import (config_dtype, load_mapped, read_config, read_safetensors, resolve_checkpoint,
                             save_mapped)


@dataclass
class SiglipConfig:
    # Field names follow the official vision_config. Defaults: siglip-base-patch16-224.
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-6
    attn_backend: str = "auto"

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf):
        """From a SiglipModel config.json (vision part under 'vision_config') or a SiglipVisionModel one."""
        vc = hf.get("vision_config", hf)
        if vc.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise NotImplementedError(f"hidden_act {vc['hidden_act']!r}: SigLIP uses gelu_pytorch_tanh")
        names = {f.name for f in fields(cls)} - {"attn_backend"}
        return cls(**{k: v for k, v in vc.items() if k in names})

    def to_hf(self, dtype=torch.float32):
        hf = {k: v for k, v in asdict(self).items() if k != "attn_backend"}
        dtype = str(dtype).replace("torch.", "")
        hf.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                  hidden_act="gelu_pytorch_tanh", attention_dropout=0.0, vision_use_head=False,
                  torch_dtype=dtype, dtype=dtype)
        return hf


# Pillow modes preprocess_image reads correctly: 8-bit ones convert to RGB as they are; single-channel 16-bit,
# 32-bit integer and float images are scaled to 8 bits first (a plain convert clips them: a 16-bit PNG turns all
# white, a 0..1 float TIFF all black). Anything else (LAB, HSV, ...) is refused, naming the file (data.py).
IMAGE_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "CMYK", "YCbCr", "I;16", "I;16L", "I;16B", "I;16N",
               "I", "F"}


def to_8bit(image):
    """A single-channel high-bit-depth image -> mode "L", 0..255. I;16: 0..65535. I (32-bit integers, which some
    16-bit files open as): read as 16-bit, so values must lie in 0..65535. F (floats): must lie in 0..1.
    Values outside those ranges have no known meaning and are an error rather than a guess."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(x).all() and 0 <= lo and hi <= 1):
            raise ValueError(f"float pixels in [{lo:g}, {hi:g}]: expected 0..1; save the image as 8-bit")
        scale = 1.0
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(f"{image.mode} pixels in [{lo:g}, {hi:g}]: expected 16-bit values 0..65535; "
                             "save the image as 8-bit")
        scale = 65535.0
    return Image.fromarray(np.round(x * (255 / scale)).astype(np.uint8), "L")


def preprocess_image(image, size=224):
    """PIL image -> (3, size, size) float32, exactly as the official SiglipImageProcessor does it:
    RGB (transparent pixels over white), bicubic resize to size x size, x * (1/255), (x - 0.5) / 0.5
    (so pixels land in [-1, 1]). High-bit-depth images are first scaled to 8 bits (to_8bit)."""
    if image.mode not in IMAGE_MODES:
        raise ValueError(f"pixel mode {image.mode!r} is not supported (supported: {', '.join(sorted(IMAGE_MODES))}); "
                         "convert the image to RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = to_8bit(image)
    if image.mode != "RGB":  # a plain convert("RGB") would show transparent areas as whatever colour they hide
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")
    image = image.resize((size, size), resample=Image.BICUBIC)
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)   # (H, W, 3), same rounding as HF
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())                       # (3, H, W)


class SiglipImages:
    """Images -> the SigLIP VLM's inputs, as data.py, sampling and GRPO ask for them: every image squashed to
    size x size and worth the same `tokens` LM tokens. qwen2_5_vl_processor.Qwen25VLImages answers the same three
    questions for Qwen2.5-VL, whose images keep their own size.

        images = SiglipImages(224, 49)
        images([pil_a, pil_b])           # {"pixel_values": (2, 3, 224, 224)}, concatenated along dim 0 in a batch
        images.image_tokens("a.jpg")     # 49: LM tokens for that image (no need to open it)"""

    def __init__(self, size, tokens):
        self.size, self.tokens = size, tokens

    def image_tokens(self, path):
        return self.tokens

    def __call__(self, images):
        pixels = [preprocess_image(image, self.size) for image in images]
        return {"pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, self.size, self.size)}

    def __str__(self):
        return f"{self.tokens} tokens per image ({self.size}x{self.size} pixels)"


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))   # (B, C, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                              # (B, N, C)
        return x + self.positions(gh, gw)[None]

    def positions(self, gh, gw):
        """Learned positions for a gh x gw grid; bicubic-interpolated when the image size differs from training."""
        pos = self.position_embedding.weight                                         # (N, C)
        side = int(pos.shape[0] ** 0.5)
        if (gh, gw) == (side, side):
            return pos
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)                   # (1, C, side, side)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)                         # (gh*gw, C)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.n_head, C // self.n_head) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, causal=False, backend=self.cfg.attn_backend)           # (B, N, H, D)
        return self.out_proj(y.reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipViT(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # for training from scratch; from_pretrained overwrites everything
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, pixel_values):
        """pixel_values (B, 3, H, W) -> last hidden states after post_layernorm (B, num_patches, hidden)."""
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)

    # ---- official checkpoints -------------------------------------------------------------------------------

    def hf_key_map(self, prefix="vision_model."):
        """Our parameter names -> the official names (under `prefix` in a full SiglipModel checkpoint)."""
        m = {"embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
             "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
             "embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
             "post_layernorm.weight": "post_layernorm.weight", "post_layernorm.bias": "post_layernorm.bias"}
        for i in range(self.cfg.num_hidden_layers):
            hf = f"encoder.layers.{i}."
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                for wb in ("weight", "bias"):
                    m[f"layers.{i}.self_attn.{p}.{wb}"] = f"{hf}self_attn.{p}.{wb}"
            for p in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                for wb in ("weight", "bias"):
                    m[f"layers.{i}.{p.replace('mlp.', '')}.{wb}"] = f"{hf}{p}.{wb}"
        return {k: prefix + v for k, v in m.items()}

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, attn_backend="auto"):
        """Load a SiglipModel (text tower ignored) or SiglipVisionModel checkpoint. dtype None: float32."""
        ckpt = resolve_checkpoint(path_or_repo_id)
        cfg = SiglipConfig.from_hf(read_config(ckpt))
        cfg.attn_backend = attn_backend
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_safetensors(ckpt)
        # transformers 5.x saves SiglipVisionModel without the "vision_model." prefix; full SiglipModel keeps it.
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
        ignore = [r"text_model\..*", r"logit_scale", r"logit_bias", re.escape(prefix) + r"head\..*"]
        load_mapped(model, tensors, model.hf_key_map(prefix), ckpt, ignore, dtype=config_dtype(dtype) or torch.float32)
        return model.eval()

    def save_pretrained(self, out_dir):
        """Write a SiglipVisionModel checkpoint (config.json + model.safetensors, official key names)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = self.post_layernorm.weight.dtype
        (out_dir / "config.json").write_text(json.dumps(self.cfg.to_hf(dtype), indent=2))
        save_mapped(self, self.hf_key_map(), out_dir)

