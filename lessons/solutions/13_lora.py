"""Answers to the exercises of lesson 13 (LoRA). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def lora_params(model, rank):
    return sum(rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))


def wrong_lora_params(model, rank):
    return sum(rank * m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))   # A only


def merge(weight, A, B, alpha, rank):
    return weight + (alpha / rank) * B @ A


def wrong_merge(weight, A, B, alpha, rank):
    return weight + B @ A                                   # forgets the alpha / rank scale


def update_rank(layer):
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    return int(torch.linalg.matrix_rank(delta))


def wrong_update_rank(layer):
    return int(torch.linalg.matrix_rank(layer.merged_linear().weight.detach()))   # the whole merged weight
