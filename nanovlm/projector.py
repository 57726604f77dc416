"""The bridge from vision to language: pixel shuffle, then a 2-layer MLP into the LM's width.

SigLIP-224 gives 196 patch vectors (a 14 x 14 grid) of width 768. Feeding all 196 to the LM is expensive, so
pixel shuffle trades sequence length for width: each 2 x 2 block of neighbouring patches becomes one vector
of 4 x 768, giving 49 tokens. No information is thrown away; it is a reshape. The MLP (Linear-GELU-Linear)
then learns to map those vectors to something the LM reads like its own token embeddings.

Slot embeddings (optional, `--slot-embedding`): a learned vector per output token, added after the MLP, so
each image token says which place of the image it comes from. The ViT does add positions, but a from-scratch
ViT's patch content can outweigh them, so "Where is the red circle?" may have little to read back from the token
that holds the circle. The LM's rotary positions shape where attention looks but put no position into the values
it brings back (the LM can still learn to compute positions itself). Off by default: on the tiny default they
helped position questions but cost colour and shape (docs/experiments.md).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ProjectorConfig:
    vision_hidden: int = 768
    lm_hidden: int = 896
    shuffle_factor: int = 2        # 1 = no shuffle
    mlp_hidden: int = 0            # 0: lm_hidden
    slot_embedding: bool = False   # add a learned vector per image token (its place in the image)
    n_slots: int = 0               # image tokens per image (set by VLMConfig)


def pixel_shuffle(x, factor):
    """(B, N, C) on a square grid -> (B, N / factor^2, C * factor^2), merging factor x factor neighbours."""
    B, N, C = x.shape
    side = int(N ** 0.5)
    if side * side != N or side % factor:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {factor}; got {N} patches")
    g = side // factor
    x = x.view(B, g, factor, g, factor, C)            # rows split into (block row, row within block), same for columns
    x = x.permute(0, 1, 3, 2, 4, 5)                   # (B, g, g, factor, factor, C)
    return x.reshape(B, g * g, factor * factor * C)   # (B, N / f^2, f^2 * C)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.mlp_hidden or cfg.lm_hidden
        self.fc1 = nn.Linear(cfg.vision_hidden * cfg.shuffle_factor ** 2, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.lm_hidden)
        # std 0.2: on the scale of the MLP's output once trained (~0.1-0.3 a channel), so the LM sees the place
        # from the start; at 0.02 (the token embeddings' scale) the tiny model did not pick it up (docs/experiments.md).
        self.slot_embed = nn.Parameter(0.2 * torch.randn(cfg.n_slots, cfg.lm_hidden)) if cfg.slot_embedding else None

    def forward(self, x):
        """(B, N, vision_hidden) -> (B, N / f^2, lm_hidden)"""
        x = self.fc2(self.act(self.fc1(pixel_shuffle(x, self.cfg.shuffle_factor))))
        if self.slot_embed is not None:
            if x.shape[1] != self.cfg.n_slots:
                raise ValueError(f"the projector has slot embeddings for {self.cfg.n_slots} image tokens, got "
                                 f"{x.shape[1]}: images must be at the resolution the model was built for")
            x = x + self.slot_embed.to(x.dtype)                                      # (B, N / f^2, lm_hidden)
        return x
