"""Answers to the exercises of lesson 3 (SigLIP). Each `wrong_*` is a plausible mistake its checker catches."""

import torch
import torch.nn.functional as F


def patchify(images, p):
    B, ch, H, W = images.shape
    x = images.view(B, ch, H // p, p, W // p, p)            # (B, 3, rows, p, cols, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                          # (B, rows, cols, 3, p, p): the conv kernel's order
    return x.reshape(B, (H // p) * (W // p), ch * p * p)


def wrong_patchify(images, p):
    B, ch, H, W = images.shape
    x = images.view(B, ch, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)   # channels last: (p, p, 3)
    return x.reshape(B, (H // p) * (W // p), ch * p * p)


def sigmoid_loss(img_emb, txt_emb, t, b):
    logits = t * img_emb @ txt_emb.T + b
    z = 2 * torch.eye(len(img_emb)) - 1
    return -F.logsigmoid(z * logits).sum() / len(img_emb)


def wrong_sigmoid_loss(img_emb, txt_emb, t, b):
    logits = t * img_emb @ txt_emb.T + b
    return -F.logsigmoid(logits.diag()).sum() / len(img_emb)    # positives only: forgets the n^2 - n negatives


def vit_params(image_size, patch, C, mlp, layers):
    n_patches = (image_size // patch) ** 2
    embed = 3 * patch * patch * C + C + n_patches * C        # patch conv (weight, bias), position table
    block = 4 * (C * C + C) + (C * mlp + mlp) + (mlp * C + C) + 2 * 2 * C   # q, k, v, out; fc1, fc2; 2 LayerNorms
    return embed + layers * block + 2 * C                    # + the final LayerNorm


def wrong_vit_params(image_size, patch, C, mlp, layers):
    block = 4 * C * C + 2 * C * mlp                          # the matrices only: no biases, norms, positions
    return 3 * patch * patch * C + layers * block
