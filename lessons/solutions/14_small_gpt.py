"""Answers to the exercises of lesson 14 (a small GPT). Each `wrong_*` is a plausible mistake its checker catches."""

import numpy as np
import torch


def gpt_params(vocab_size, block_size, n_layer, n_embd):
    C = n_embd
    per_block = 12 * C * C + 13 * C                      # qkv, out proj, MLP (all with biases), two LayerNorms
    return vocab_size * C + block_size * C + n_layer * per_block + 2 * C   # + the final LayerNorm; head tied


def wrong_gpt_params(vocab_size, block_size, n_layer, n_embd):
    return gpt_params(vocab_size, block_size, n_layer, n_embd) + vocab_size * n_embd   # the head counted again


def nearest_codes(patches, centres):
    d = ((patches[:, :, None, :].astype(np.float64) - centres[None, None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(-1)                                   # (N, P): ties go to the lower id, as argmin does


def wrong_nearest_codes(patches, centres):
    return (patches @ centres.T).argmax(-1)              # largest dot product: favours centres with large norms


def classify(logits_at_cls, class_ids):
    return logits_at_cls[:, torch.as_tensor(class_ids)].argmax(-1)


def wrong_classify(logits_at_cls, class_ids):
    best = logits_at_cls.argmax(-1)                      # over the whole vocabulary, then mapped to a class
    lookup = {int(t): i for i, t in enumerate(class_ids)}
    return torch.tensor([lookup.get(int(t), 0) for t in best])
