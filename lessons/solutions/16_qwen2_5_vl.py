"""Answers to the exercises of lesson 16 (Qwen2.5-VL). Each `wrong_*` is a plausible mistake its checker catches."""

import math

import torch


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    h, w = round(height / factor) * factor, round(width / factor) * factor   # a thin side may round to 0
    if h * w > max_pixels:                       # shrink both sides by the same factor, rounding down
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:                     # grow both sides by the same factor, rounding up
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def wrong_smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    # rounds each side but forgets the pixel budget: a photograph keeps all its pixels
    return max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)


def image_positions(p, t, h, w):
    tt, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack([tt, rows, cols]).reshape(3, -1) + p          # (3, t*h*w)
    return positions, p + max(t, h, w)


def wrong_image_positions(p, t, h, w):
    positions, _ = image_positions(p, t, h, w)
    return positions, p + t * h * w               # counts tokens, as 1-D RoPE would: not MRoPE's rule
