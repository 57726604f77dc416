"""
LoRA: fine-tune a big model by training a small low-rank correction to some of its linear layers.

A linear layer computes y = x W^T + b with W of shape (out, in). LoRA freezes W and learns

    y = x W^T + b + (x A^T B^T) * alpha / rank        A: (rank, in), B: (out, rank), rank << in, out

so the update to W is the rank-`rank` matrix (alpha / rank) * B @ A. For Qwen2.5-0.5B at rank 16 on every
LM linear layer that is ~9M trained parameters instead of 494M: the optimizer state shrinks ~50x, and for
GRPO the reference model comes for free, because it is the same network with the adapters switched off.

Initialisation (as in the paper and PEFT): A random (kaiming-uniform, like nn.Linear), B zero. So at step 0
the adapted model computes exactly what the base model computes, and the first gradient still flows (into B,
through the random A). The update is scaled by alpha / rank; alpha = 2 * rank is a common choice, which makes
the scale 2 at every rank. Neither keeps a step's effect constant across ranks under Adam (lesson 13 measures
it: alpha proportional to sqrt(rank), as in rsLoRA, comes closest), so retune the learning rate with the rank.

Which layers: --lora-targets takes module-name patterns. The first part names a part of the VLM (lm, vision,
projector); the rest, if any, must appear as consecutive components of the module's name:

    lm              every linear layer of the language model (q/k/v/o and gate/up/down of each block)
    lm.attn         the LM's attention projections only          (lm.layers.3.attn.q_proj, ...)
    lm.mlp          the LM's MLPs only
    vision          every linear layer of the vision tower (optional; it is usually left frozen)
The output head (lm.lm_head, when untied) is only adapted if a pattern names it. Every other parameter of a
targeted part is frozen: only the adapters of that part train. Parts with no target keep their own learning
rate (e.g. the projector may still train fully during SFT).

Checkpoints stay plain VLM checkpoints. Training saves the *merged* weights W + (alpha / rank) B A in
model.safetensors, so VLM.from_pretrained and sample.py read a LoRA run like any other, and the adapters A, B
in train_state.pt. Resuming (load_checkpoint below) rebuilds the model from the same --init-from, wraps it
again, loads every non-adapted weight from the checkpoint and the adapters from train_state.pt: exact,
because the adapted base weights are frozen and so still equal to the --init-from ones (this is checked).
"""

import contextlib
import math

import torch
import torch.nn as nn

from nanovlm import train_utils as tu


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; forward = base(x) + scaling * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank, alpha, generator=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight
        a = torch.empty(rank, base.in_features)   # drawn on the CPU, so a seeded generator works for any device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)   # nn.Linear's own init
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))                                  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))  # (out, rank)
        self.scaling = alpha / rank
        self.enabled = True     # adapters_disabled() switches this off to get the base model back

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        # Two thin matmuls, (.., in) -> (.., rank) -> (.., out): never materialise the (out, in) update.
        return y + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def merged_linear(self):
        """A plain nn.Linear computing what this layer computes: weight W + scaling * B @ A (a new tensor; the
        base is untouched), bias shared with the base."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(base.weight + (self.lora_B @ self.lora_A) * self.scaling)   # (out, in)
        if base.bias is not None:
            merged.bias = base.bias
        return merged


# ----------------------------------------------------------------------------------------------------------
# Wrapping the model

def matches(name, pattern):
    """Does module `name` (e.g. lm.layers.0.attn.q_proj) match `pattern` (lm, lm.attn, vision, ...)?"""
    first, *rest = pattern.split(".")
    parts = name.split(".")
    if parts[0] != first:
        return False
    if parts[-1] == "lm_head" and "lm_head" not in rest:   # the vocabulary head only when asked for
        return False
    tail, k = parts[1:], len(rest)
    return k == 0 or any(tail[i:i + k] == rest for i in range(len(tail) - k + 1))


def _set_module(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def apply_lora(model, targets, rank, alpha=None, seed=0):
    """Wrap every nn.Linear of `model` matching one of `targets` in a LoRALinear (in place) and freeze every
    other parameter of each targeted part. alpha defaults to 2 * rank. A is drawn from a generator seeded with
    `seed`, so every DDP rank builds the same adapters. Returns the wrapped module names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not targets:
        raise ValueError("LoRA needs at least one target pattern (e.g. --lora-targets lm)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters")
    alpha = 2 * rank if alpha is None else alpha
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = {}
    for pattern in targets:
        hits = [n for n in linears if matches(n, pattern)]
        if not hits:
            parts = sorted({n.split(".")[0] for n in linears})
            raise ValueError(f"LoRA target {pattern!r} matches no linear layer; patterns start with a part of "
                             f"the model ({', '.join(parts)}), e.g. 'lm', 'lm.attn', 'lm.mlp', 'vision'")
        chosen.update(dict.fromkeys(hits))
    for part in {n.split(".")[0] for n in chosen}:
        model.get_submodule(part).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in chosen:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, generator=g))
    return list(chosen)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model):
    return bool(lora_layers(model))


def is_adapter(param_name):
    return param_name.endswith(("lora_A", "lora_B"))


def adapter_state(model):
    """{name: tensor} of the adapters only (what train_state.pt keeps), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_adapter(n)}


# ----------------------------------------------------------------------------------------------------------
# Switching adapters off, merging them

@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, the model computes the base model: GRPO's reference model without a second copy in memory."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@contextlib.contextmanager
def merged(model):
    """Inside, each LoRALinear is replaced by a plain nn.Linear with the merged weight, so the model has the
    plain VLM's structure and parameter names (for saving a checkpoint). On exit the wrappers come back,
    untouched: merging into a copy, never into the frozen base, keeps training bit-exact. No-op without LoRA."""
    swapped = lora_layers(model)
    for name, layer in swapped:
        _set_module(model, name, layer.merged_linear())
    try:
        yield model
    finally:
        for name, layer in swapped:
            _set_module(model, name, layer)


def merge_lora(model):
    """Fold the adapters into the weights for good (export): every LoRALinear becomes a plain nn.Linear with
    weight W + (alpha / rank) B A. Returns the model, now a plain VLM that save_pretrained writes as usual."""
    for name, layer in lora_layers(model):
        _set_module(model, name, layer.merged_linear())
    return model


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def save_extra(model):
    """What train_state.pt's "extra" holds for a LoRA run: the adapters (empty without LoRA)."""
    return {"lora": adapter_state(model)} if has_lora(model) else {}


def load_checkpoint(path, model, optimizer, rank=0, device="cpu", names=None):
    """train_utils.load_checkpoint for --resume, with or without LoRA adapters in `model`.

    model.safetensors holds merged weights, so it loads into the merged view of the model: that fills every
    non-adapted parameter in place (and the optimizer and RNG states); the merged copies of the adapted
    layers are then compared with base + adapters from train_state.pt, which catches a resume from a
    different --init-from (the frozen base weights come from there, not from the checkpoint). names: as
    train_utils.load_checkpoint's (the file's names of the merged model's parameters).
    """
    if not has_lora(model):
        return tu.load_checkpoint(path, model, optimizer, rank, device, names)
    layers = [name for name, _ in lora_layers(model)]
    with merged(model):
        state = tu.load_checkpoint(path, model, optimizer, rank, device, names)
        saved = {name: model.get_submodule(name).weight.detach().clone() for name in layers}   # merged, (out, in)
    adapters = state.get("extra", {}).get("lora")
    if adapters is None:
        raise ValueError(f"{path}/train_state.pt has no LoRA adapters: was it saved by a run without --lora-rank?")
    params = dict(model.named_parameters())
    missing = set(adapters) ^ {n for n in params if is_adapter(n)}
    if missing:
        raise ValueError(f"{path}: the saved LoRA adapters do not match this model's ({sorted(missing)[:4]}...): "
                         "resume with the same --lora-rank and --lora-targets")
    with torch.no_grad():
        for n, t in adapters.items():
            params[n].copy_(t)
    for name, layer in lora_layers(model):
        ours = layer.merged_linear().weight.detach()
        if (ours - saved[name]).abs().max() > 1e-4 * ours.abs().max() + 1e-6:
            raise ValueError(f"{path}: merged weight {name} is not base + adapters: resume with the same "
                             "--init-from as the run that wrote this checkpoint")
    return state
