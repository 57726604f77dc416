"""Answers to the exercises of lesson 2 (a Qwen2 block). Each `wrong_*` is a plausible mistake its checker catches."""

import math

import torch


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def wrong_rms_norm(x, weight, eps):
    mean = x.mean(-1, keepdim=True)                                 # LayerNorm's centring: not RMSNorm
    return weight * (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)


def rope_interleaved(x, pos, base):
    D = x.shape[0]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)   # (D/2,)
    angle = pos * theta
    cos, sin = angle.cos().float(), angle.sin().float()
    even, odd = x[0::2], x[1::2]                                     # plane i = (x_2i, x_2i+1)
    out = torch.empty_like(x)
    out[0::2] = even * cos - odd * sin
    out[1::2] = odd * cos + even * sin
    return out


def wrong_rope_interleaved(x, pos, base):
    D = x.shape[0]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = pos * theta
    cos, sin = angle.cos().float(), angle.sin().float()
    first, second = x[:D // 2], x[D // 2:]                           # split halves: the other convention
    return torch.cat([first * cos - second * sin, second * cos + first * sin])


def swiglu_width(C):
    return round(8 * C / 3)                                          # 3 C h = 8 C^2


def wrong_swiglu_width(C):
    return 4 * C                                                     # GPT-2's width: 1.5x the parameters
