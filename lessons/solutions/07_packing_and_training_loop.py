"""Answers to the exercises of lesson 7 (packing, the loop). Each `wrong_*` is a plausible mistake its checker catches."""

import math

import torch


def schedule(step, max_steps, base_lr, warmup, min_ratio):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = base_lr * min_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - floor)


def wrong_schedule(step, max_steps, base_lr, warmup, min_ratio):
    if step < warmup:
        return base_lr * step / warmup                     # starts at 0: the first step is wasted
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = base_lr * min_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - floor)


def clip_global(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * factor for g in grads]


def wrong_clip_global(grads, max_norm):
    return [g * min(1.0, max_norm / (float(g.norm()) + 1e-6)) for g in grads]   # per tensor: changes the direction


def first_fit_rows(lengths, max_length):
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):    # stable: ties keep index order
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(max_length)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def wrong_first_fit_rows(lengths, max_length):
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not rows or room[-1] < lengths[i]:                # next-fit: only the last row is tried
            rows.append([])
            room.append(max_length)
        rows[-1].append(i)
        room[-1] -= lengths[i]
    return rows
