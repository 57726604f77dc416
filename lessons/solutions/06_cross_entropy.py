"""Answers to the exercises of lesson 6 (cross-entropy). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def next_token_loss(logits, labels):
    targets = labels[:, 1:]                                   # position t predicts token t + 1
    keep = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(logp * keep).sum() / keep.sum()


def wrong_next_token_loss(logits, labels):
    keep = labels != -100                                     # no shift: each position "predicts" its own input
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(logp * keep).sum() / keep.sum()


def per_sequence_loss(logits, labels):
    targets = labels[:, 1:]
    keep = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_row = -(logp * keep).sum(1) / keep.sum(1).clamp(min=1)
    has = keep.any(1)
    return per_row[has].mean()


def wrong_per_sequence_loss(logits, labels):
    targets = labels[:, 1:]
    keep = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (-(logp * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()   # the empty row counts as a 0


def kl_to_model(p_data, logits):
    log_q = logits.log_softmax(-1)
    nz = p_data > 0                                            # 0 log 0 = 0
    cross_entropy = -(p_data[nz] * log_q[nz]).sum()
    entropy = -(p_data[nz] * p_data[nz].log()).sum()
    return cross_entropy - entropy


def wrong_kl_to_model(p_data, logits):
    q = logits.softmax(-1)                                     # the reverse divergence, KL(q || p_data)
    return (q * (q.log() - p_data.clamp(min=1e-12).log())).sum()
