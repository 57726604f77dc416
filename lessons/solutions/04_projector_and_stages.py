"""Answers to the exercises of lesson 4 (projector). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def shuffle_by_loops(x, f):
    B, N, C = x.shape
    side = int(N ** 0.5)
    g = side // f
    out = torch.empty(B, g * g, f * f * C, dtype=x.dtype)
    for r in range(g):                       # output token (r, c) in raster order
        for c in range(g):
            parts = [x[:, (r * f + i) * side + (c * f + j)] for i in range(f) for j in range(f)]   # rows, then columns
            out[:, r * g + c] = torch.cat(parts, dim=-1)
    return out


def wrong_shuffle_by_loops(x, f):
    B, N, C = x.shape
    side = int(N ** 0.5)
    g = side // f
    out = torch.empty(B, g * g, f * f * C, dtype=x.dtype)
    for r in range(g):
        for c in range(g):
            parts = [x[:, (r * f + i) * side + (c * f + j)] for j in range(f) for i in range(f)]   # columns first
            out[:, r * g + c] = torch.cat(parts, dim=-1)
    return out


def image_tokens(image_size, patch_size, factor):
    return (image_size // patch_size) ** 2 // factor ** 2


def wrong_image_tokens(image_size, patch_size, factor):
    return (image_size // patch_size) ** 2 // factor          # divides by f, not f^2: the merge is 2-D


def splice(token_embeds, input_ids, image_token_id, features):
    out = token_embeds.clone()
    slots = input_ids == image_token_id                       # (B, T)
    out[slots] = features.reshape(-1, features.shape[-1]).to(out.dtype)   # boolean indexing: row by row, left to right
    return out


def wrong_splice(token_embeds, input_ids, image_token_id, features):
    out = token_embeds.clone()
    slots = (input_ids == image_token_id).T                   # column by column: images land in the wrong rows
    out.transpose(0, 1)[slots] = features.reshape(-1, features.shape[-1]).to(out.dtype)
    return out
