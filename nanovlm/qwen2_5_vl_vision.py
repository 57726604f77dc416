"""Qwen2.5-VL's vision tower: a ViT for images of any size, and the merger that turns 2x2 patches into one
LM token.

    vit, merger = VisionTower(cfg), PatchMerger(cfg)
    feats = merger(vit(pixel_values, grid_thw))     # (sum t*h*w, 1176) -> (sum t*h*w / 4, out_hidden_size)

pixel_values holds the patches of all images one after another, as preprocess_images writes them
(nanovlm/qwen2_5_vl_processor.py), and grid_thw says where one image ends and the next begins. There is no
batch dimension and no padding: images of different sizes are one packed sequence.

How it differs from SigLIP (nanovlm/siglip.py):
- Positions are 2-D rotary embeddings instead of a learned table, so any grid size works without
  interpolation: half of each head's rotary planes turn with the patch's row, the other half with its column.
  The score between two patches then depends on their (row, column) offset only.
- Most blocks attend within windows of 112x112 pixels (8x8 patches); `fullatt_block_indexes` (7, 15, 23, 31
  in the real models) attend over the whole image. Cost grows with the number of patches, not its square.
  The tokens are permuted so that each window is contiguous, then a window is just one more segment of the
  packed sequence: attention runs per segment (`segment_attention`), windows for most blocks, whole images
  for the full-attention ones. Nothing ever attends across images.
- RMSNorm and a SwiGLU MLP with biases (the LM's recipe), pre-norm blocks, no final norm in the tower.
- The patch embedding is a Conv3d over (2 frames, 14, 14) without bias; a patch is exactly one kernel window.

The merger (`PatchMerger`) is the projector: RMSNorm, then the 4 patches of each 2x2 block concatenated
(preprocess_images already put them next to each other) through Linear -> GELU -> Linear to the LM's width.
"""

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.attention import Packing, attention, resolve_backend
from nanovlm.qwen2 import RMSNorm, apply_rope


@dataclass
class VisionConfig:
    # Field names follow the official vision_config. Defaults: Qwen2.5-VL-3B's tower (7B's differs in out_hidden_size).
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 2048       # the LM's hidden size
    patch_size: int = 14
    spatial_merge_size: int = 2       # merge x merge patches -> one LM token
    temporal_patch_size: int = 2
    window_size: int = 112            # pixels
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    tokens_per_second: int = 2        # video only; kept so the config round-trips
    rope_theta: float = 10000.0
    attn_backend: str = "auto"

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} is not a multiple of patch_size * spatial_merge_size")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, vc):
        """From the official vision_config dict (older files spell in_channels `in_chans`)."""
        if vc.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"vision hidden_act {vc['hidden_act']!r}: Qwen2.5-VL uses silu")
        names = {f.name for f in fields(cls)} - {"attn_backend", "rope_theta"}
        kw = {k: v for k, v in vc.items() if k in names and v is not None}
        kw["in_channels"] = vc.get("in_channels", vc.get("in_chans", 3))
        kw["rope_theta"] = (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(**kw)

    def to_hf(self):
        hf = {k: v for k, v in asdict(self).items() if k not in ("attn_backend", "rope_theta")}
        hf.update(fullatt_block_indexes=list(self.fullatt_block_indexes), in_chans=self.in_channels,
                  spatial_patch_size=self.patch_size, hidden_act="silu")
        if self.rope_theta != 10000.0:   # the hub files leave the default out
            hf["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return hf


# ---- where each patch is, and which patches see each other ------------------------------------------------

def patch_positions(grid_thw, merge):
    """(row, column) of every patch, in preprocess_images' order (2x2 blocks, then the patches inside). (N, 2)"""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")      # (h, w)
        block = lambda x: x.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        out.append(torch.stack([block(rows), block(cols)], dim=1).repeat(t, 1))           # (t*h*w, 2)
    return torch.cat(out).to(grid_thw.device)


def window_order(grid_thw, merge, window):
    """Put the LM tokens (merge x merge blocks) of each window next to each other.

    window: side of a window in LM tokens (112 px / 14 / 2 = 4). Returns (order, window_lengths): order[i] is
    the block that goes to place i (windows row by row, blocks inside a window row by row, image after image),
    window_lengths the number of blocks in each window (edge windows are cut short by the image border)."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        tt, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        n_wh, n_ww = -(-gh // window), -(-gw // window)                                   # windows per column, row
        window_id = ((tt * n_wh + rows // window) * n_ww + cols // window).flatten()       # (t*gh*gw,)
        # A stable sort by window keeps the blocks of a window in their row-by-row order.
        order.append(torch.sort(window_id, stable=True).indices + offset)
        lengths.append(torch.bincount(window_id))        # every window holds at least one block: no zeros
        offset += t * gh * gw
    return torch.cat(order).to(grid_thw.device), torch.cat(lengths).to(grid_thw.device)


@dataclass
class Segments:
    """Consecutive runs (images, frames or windows) of a packed sequence, in the two forms attention takes them:
    `packing` (cu_seqlens) for flash-attn's varlen kernel and flex's block mask on a GPU, and `groups` for the
    other backends: for each run length L, the token indices (n, L) of the n runs of that length."""
    packing: Packing
    groups: list

    @classmethod
    def from_lengths(cls, lengths):
        """lengths (S,): the runs' token counts, summing to N. Built once per forward, for all blocks."""
        device, lengths = lengths.device, lengths.cpu()
        starts = lengths.cumsum(0) - lengths
        groups = [(starts[lengths == L][:, None] + torch.arange(L)).to(device) for L in lengths.unique().tolist()]
        return cls(Packing.from_lengths(lengths).to(device), groups)


def segment_attention(q, k, v, segments, backend):
    """Bidirectional attention within consecutive segments of a packed sequence (an image, a frame or a
    window each). q, k, v: (N, H, D); segments: Segments. -> (N, H, D).

    Nothing between two segments is ever computed. flash-attn runs the segments as varlen runs of one sequence
    (cu_seqlens) and flex as a block-sparse mask; math and sdpa take the segments of each length together as a
    batch (n, L, H, D), so a batch of equal images (or the full windows of an image) is one plain attention call."""
    backend = resolve_backend(backend, q.device, q.dtype, "packed")
    if backend in ("flash", "flex"):
        return attention(q[None], k[None], v[None], causal=False, backend=backend, packing=segments.packing)[0]
    out = torch.empty_like(q)
    for index in segments.groups:                                                      # (n, L) token indices
        out[index] = attention(q[index], k[index], v[index], causal=False, backend=backend)   # (n, L, H, D)
    return out


# ---- the modules -------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values):
        """(N, C*T*p*p) -> (N, hidden). One patch is one kernel window, so the convolution is a matrix product
        (the weight (hidden, C, T, p, p) flattens in the order the patch does)."""
        w = self.proj.weight
        return F.linear(pixel_values.to(device=w.device, dtype=w.dtype), w.reshape(w.shape[0], -1))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, segments):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.cfg.num_heads, self.cfg.head_dim).unbind(1)   # (N, H, D) each
        # The rotation in fp32 (cos, sin are fp32), as the reference does: bf16 angles blur neighbouring patches.
        q = apply_rope(q[None].float(), cos[None], sin[None])[0].to(v.dtype)
        k = apply_rope(k[None].float(), cos[None], sin[None])[0].to(v.dtype)
        y = segment_attention(q, k, v, segments, self.cfg.attn_backend)                   # (N, H, D)
        return self.proj(y.reshape(N, C))


class MLP(nn.Module):
    """SwiGLU, as the LM's (nanovlm/qwen2.py) but with biases."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))   # the hub's visual.blocks

    def rope_cos_sin(self, positions):
        """2-D rotary angles: (N, 2) (row, column) -> cos, sin (N, head_dim) in fp32.

        A head of dimension D has D/2 rotary planes (split halves, as in the LM). The first D/4 turn with the
        row, the next D/4 with the column, at the frequencies theta^(-4i/D), i < D/4, used for both."""
        quarter = self.cfg.head_dim // 4
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, 2 * quarter, 2, device=positions.device).float()
                                                 / (2 * quarter))                           # (D/4,)
        angles = (positions[:, :, None].float() * inv_freq).flatten(1)                        # (N, D/2): rows, cols
        emb = torch.cat((angles, angles), dim=-1)                                             # (N, D)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        """(N, C*T*p*p) patches of all images, grid_thw (n, 3) -> (N, hidden), in the input's order."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        N = pixel_values.shape[0]
        if int(grid_thw.prod(-1).sum()) != N:
            raise ValueError(f"pixel_values has {N} patches but image_grid_thw {grid_thw.tolist()} describes "
                             f"{int(grid_thw.prod(-1).sum())}")
        if (grid_thw[:, 1:] % cfg.spatial_merge_size).any():
            raise ValueError(f"image_grid_thw {grid_thw.tolist()}: heights and widths must be multiples of "
                             f"spatial_merge_size {cfg.spatial_merge_size} (preprocess_images makes them so)")
        x = self.patch_embed(pixel_values)                                                    # (N, hidden)
        grid_thw = grid_thw.to(x.device)          # the bookkeeping below is built where the grid is
        cos, sin = self.rope_cos_sin(patch_positions(grid_thw, cfg.spatial_merge_size))
        # Window order: whole merge blocks move (their patches stay together), so perm is per patch.
        blocks, window_blocks = window_order(grid_thw, cfg.spatial_merge_size,
                                             cfg.window_size // cfg.patch_size // cfg.spatial_merge_size)
        perm = (blocks[:, None] * unit + torch.arange(unit, device=blocks.device)).flatten()  # (N,)
        x, cos, sin = x[perm], cos[perm], sin[perm]
        # The segments of the packed sequence, once for all blocks: windows, and (images (frames) stay
        # contiguous under the permutation) whole frames for the full-attention blocks.
        windows = Segments.from_lengths(window_blocks * unit)                                 # patches per window
        frames = Segments.from_lengths(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]))
        if x.is_cuda:                              # flex's block masks, once, outside any compiled block
            windows.packing.prepare_flex(causal=False), frames.packing.prepare_flex(causal=False)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, frames if i in cfg.fullatt_block_indexes else windows)
        return x[torch.argsort(perm)]                                                         # back to input order


class PatchMerger(nn.Module):
    """RMSNorm per patch, then each merge x merge block's patches concatenated -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.wide = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.fc1 = nn.Linear(self.wide, self.wide)
        self.fc2 = nn.Linear(self.wide, cfg.out_hidden_size)

    def forward(self, x):
        """(N, hidden) patches, merge blocks consecutive -> (N / merge^2, out_hidden_size)"""
        x = self.ln_q(x).reshape(-1, self.wide)     # (N / merge^2, hidden * merge^2)
        return self.fc2(F.gelu(self.fc1(x)))
