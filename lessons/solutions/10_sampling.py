"""Answers to the exercises of lesson 10 (sampling). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def nucleus(probs, top_p):
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    keep = torch.zeros(len(probs), dtype=torch.bool)
    mass = 0.0
    for i in order:
        if mass >= top_p:                  # the mass before this token already reaches top_p
            break
        keep[i] = True
        mass += float(probs[i])
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def wrong_nucleus(probs, top_p):
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    keep = torch.zeros(len(probs), dtype=torch.bool)
    mass = 0.0
    for i in order:
        if mass + float(probs[i]) > top_p:  # stops before the token that crosses top_p: can keep nothing
            break
        keep[i] = True
        mass += float(probs[i])
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def sampling_distribution(logits, temperature, top_k, top_p, penalty, seen):
    z = logits.clone().float()
    for t in set(seen):                     # 1. repetition penalty on the raw logits
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    p = (z / temperature).softmax(-1)       # 2. temperature
    if top_k:                               # 3. top-k
        kth = p.topk(top_k).values[-1]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum()
    if top_p < 1.0:                         # 4. top-p on what is left
        p = nucleus(p, top_p)
    return p


def wrong_sampling_distribution(logits, temperature, top_k, top_p, penalty, seen):
    z = logits.clone().float()
    for t in set(seen):
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    p = z.softmax(-1)                       # the cuts made at T = 1, the temperature only afterwards
    if top_k:
        kth = p.topk(top_k).values[-1]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
    if top_p < 1.0:
        p = nucleus(p / p.sum(), top_p)
    z = torch.where(p > 0, logits.float() / temperature, torch.full_like(p, float("-inf")))
    return z.softmax(-1)
