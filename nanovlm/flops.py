"""Counting training FLOPs, and MFU: the FLOP/s a run achieves over its device's peak.

    flops = train_flops(model, batch)            # the VLMs: what this batch really computes (forward + backward)
    fpt = flops_per_token(n_params, L, T, d)     # a plain decoder (train_gpt.py): nanoGPT's 6N + 12LTd estimate
    utilisation = mfu(flops / seconds, device)   # None on a CPU or an unknown GPU

Lesson 9 works through why counting what runs matters (a frozen tower, packed rows, the head on labelled tokens).
"""

import re

import torch

from nanovlm import lora
from nanovlm.qwen2_5_vl_vision import window_order

# Dense bf16 peak FLOP/s (no sparsity, FP32 accumulate), from the vendors' datasheets. Matched against the device
# name in this order, so the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L40" before
# "L4"). A name matching none of them gives no MFU rather than a wrong one.
PEAK_BF16_FLOPS = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
                   ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
                   ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None (CPU, unknown GPU)."""
    if not str(device).startswith("cuda"):
        return None
    return peak_flops_of(torch.cuda.get_device_name(torch.device(device)))


def peak_flops_of(name):
    """The peak for a device name (torch.cuda.get_device_name), or None when the table does not know it."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", name):
            return flops
    return None


def flops_per_token(n_params, n_layers, seq_len, d_model):
    """nanoGPT's estimate of training FLOPs per token for a decoder whose every weight trains on every token:
    6N for the matmuls (2 forward + 4 backward per weight) plus 12 * L * T * d for attention scores and weighted
    sums at sequence length T (PaLM appendix B; the full T x T, as nanoGPT's estimate_mfu). train_gpt.py uses
    it (fixed-length sequences); the VLM counts what runs instead (train_flops)."""
    return 6 * n_params + 12 * n_layers * seq_len * d_model


def mfu(flops_per_s, device):
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s (counted as in train_flops) over the device's
    peak, or None where no peak is known (CPU)."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_s / peak


def train_flops(model, batch):
    """FLOPs of one forward and backward pass of `model` over a collated (CPU) batch, counting what runs, for MFU.

    Matrix products cost 2 FLOPs per multiply-add. Each weight's forward runs over the tokens it sees: the ViT
    over the patches of the batch's images, the projector over their image tokens, the LM over the real (not
    padding) tokens, the output head only over the labelled positions. Attention scores and weighted sums are
    counted per sample: L (L + 1) / 2 query-key pairs for a causal sample of L tokens, P^2 for an image of P
    patches; Qwen2.5-VL's tower, P^2 per window of P patches in its window blocks and per image (frame) in its
    full-attention blocks. The backward pass costs 2x a layer's forward for the input gradient when anything
    before the layer trains (a gradient must pass through it), plus 2x for the weight gradient when its weight
    trains. Norms, activations, biases, rotary embeddings and embedding lookups are left out: a few percent at most."""
    cfg, lm, vit = model.cfg, model.lm, model.vision
    total, grad = 0, False      # grad: does a gradient have to flow back into the current layer's input?

    def linear(module, n):      # an nn.Linear (or LoRA-wrapped one) applied to n tokens
        nonlocal total, grad
        if isinstance(module, lora.LoRALinear):   # the frozen base, then the two thin adapter products
            linear(module.base, n)
            r, (out_f, in_f) = module.lora_A.shape[0], module.base.weight.shape
            total, grad = total + 3 * 2 * r * (in_f + out_f) * n, True
            return
        trains = module.weight.requires_grad
        total += 2 * module.weight.numel() * n * (1 + grad + trains)
        grad = grad or trains

    def attention(pairs, width):   # QK^T and the weighted sum of V: 2 products of `width` channels per pair
        nonlocal total
        total += 2 * 2 * pairs * width * (1 + 2 * grad)

    def patch_embedding(conv, n):   # the first layer: a gradient into its input (the pixels) is never needed
        nonlocal total, grad
        grad = conv.weight.requires_grad
        total += 2 * conv.weight.numel() * n * (1 + grad)

    # A batch without images runs a blank one through a training vision side (VLM.embed, Qwen25VL.embed): its
    # features count 0 times, but it is computed.
    blank = model.vision_side_trains()
    image_tokens = 0
    if "image_grid_thw" in batch:   # Qwen2.5-VL: each image at its own size
        grid, v = batch["image_grid_thw"], cfg.vision
        m = v.spatial_merge_size
        if not len(grid) and blank:
            grid = torch.tensor([[1, m, m]])   # the smallest image: one merged token
        if len(grid):
            patches = int(grid.prod(-1).sum())
            patch_embedding(vit.patch_embed.proj, patches)
            _, windows = window_order(grid, m, v.window_size // v.patch_size // m)   # merged tokens per window
            pairs = {"window": int(((windows * m * m) ** 2).sum()),                    # per window, both ways
                     "full": int((grid[:, 0] * (grid[:, 1] * grid[:, 2]) ** 2).sum())}   # per frame
            for i, layer in enumerate(vit.layers):
                linear(layer.attn.qkv, patches)
                attention(pairs["full" if i in v.fullatt_block_indexes else "window"], v.hidden_size)
                for lin in (layer.attn.proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    linear(lin, patches)
            image_tokens = patches // (m * m)
    else:   # the SigLIP VLM: every image at one size
        n_images = batch["pixel_values"].shape[0] or int(blank)
        patches = (cfg.image_size // cfg.vision.patch_size) ** 2
        if n_images:
            patch_embedding(vit.embeddings.patch_embedding, n_images * patches)
            for layer in vit.layers:
                a = layer.self_attn
                for lin in (a.q_proj, a.k_proj, a.v_proj):
                    linear(lin, n_images * patches)
                attention(n_images * patches ** 2, cfg.vision.hidden_size)
                for lin in (a.out_proj, layer.fc1, layer.fc2):
                    linear(lin, n_images * patches)
            image_tokens = n_images * cfg.image_tokens
    if image_tokens:
        linear(model.projector.fc1, image_tokens)
        linear(model.projector.fc2, image_tokens)
    grad = grad or lm.embed_tokens.weight.requires_grad
    lengths = sample_lengths(batch["attention_mask"])
    n_real, pairs = sum(lengths), sum(L * (L + 1) // 2 for L in lengths)
    for layer in lm.layers:
        a, m = layer.attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            linear(lin, n_real)
        attention(pairs, lm.cfg.num_attention_heads * lm.cfg.head_dim)
        for lin in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            linear(lin, n_real)
    n_labelled = int((batch["labels"][:, 1:] != -100).sum())
    linear(lm.lm_head if lm.lm_head is not None else lm.embed_tokens, n_labelled)   # tied: the embedding matrix
    return total


def sample_lengths(attention_mask):
    """Token counts of the samples in a batch: one per row (0/1 mask) or several per packed row (1, 2, ...)."""
    lengths = []
    for row in attention_mask.long():
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        lengths += [int(c) for i, c in zip(ids.tolist(), counts.tolist()) if i > 0]
    return lengths
