"""Answers to the exercises of lesson 9 (distributed training). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def to_bf16(x):
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF            # the float32's bits, as an unsigned number
    lower = bits & 0xFFFF                                             # the 16 bits bf16 drops
    upper = bits >> 16
    round_up = (lower > 0x8000) | ((lower == 0x8000) & (upper & 1 == 1))   # nearest, ties to even
    upper = upper + round_up.to(torch.int64)
    out = (upper << 16) & 0xFFFFFFFF
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32).view(torch.float32)


def wrong_to_bf16(x):
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = (bits >> 16) << 16                                          # truncation: always rounds toward zero
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32).view(torch.float32)


def ring_all_reduce(vectors):
    W = len(vectors)
    chunks = [list(v.chunk(W)) for v in vectors]                      # chunks[rank][c]
    sent = 0
    for step in range(W - 1):                                         # reduce-scatter
        msgs = [(r, (r - step) % W, chunks[r][(r - step) % W].clone()) for r in range(W)]
        for r, c, data in msgs:
            chunks[(r + 1) % W][c] += data
        sent += len(msgs[0][2])
    # now rank r holds the full sum of chunk (r + 1) % W
    for step in range(W - 1):                                         # all-gather
        msgs = [(r, (r + 1 - step) % W, chunks[r][(r + 1 - step) % W].clone()) for r in range(W)]
        for r, c, data in msgs:
            chunks[(r + 1) % W][c] = data
        sent += len(msgs[0][2])
    return [torch.cat(c) for c in chunks], sent


def wrong_ring_all_reduce(vectors):
    W = len(vectors)
    total = torch.stack(vectors).sum(0)                               # everyone sends everything to everyone
    return [total.clone() for _ in range(W)], (W - 1) * len(vectors[0])
