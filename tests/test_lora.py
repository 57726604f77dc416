"""lora.py against hand computations: the adapted layer's formula, identity at init, merge == unmerged,
adapters off == base, only adapters train; and a LoRA SFT run whose checkpoint is a plain VLM and resumes exactly."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import randomize, tiny_config
from nanovlm import lora
from nanovlm.vlm import VLM
from nanovlm.vlm_train import make_vlm_optimizer, setup_trainable


def tiny_vlm(seed=0):
    cfg = tiny_config(lm=dict(vocab_size=64, tie_word_embeddings=True),
                      vision=dict(image_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2),
                      projector=dict(shuffle_factor=1), image_token_id=63, stop_token_ids=(62, 61), pad_token_id=61)
    return randomize(VLM(cfg), std=0.2, seed=seed).eval()


def inputs(model):
    g = torch.Generator().manual_seed(1)
    n = model.cfg.image_tokens                                   # 4
    ids = torch.randint(0, 60, (2, 10), generator=g)
    ids[0, 1:1 + n] = model.cfg.image_token_id
    ids[1, 3:3 + n] = model.cfg.image_token_id
    return ids, torch.randn(2, 3, 16, 16, generator=g)


def logits(model):
    ids, pix = inputs(model)
    with torch.no_grad():
        return model(ids, pix)["logits"]


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_lora_linear_is_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(copy.deepcopy(base), rank=3, alpha=12.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (12.0 / 3) * x @ (B @ A).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.base.weight.requires_grad is False and layer.lora_A.requires_grad
    # kaiming-uniform(a=sqrt(5)) on (rank, in): bound = 1 / sqrt(in)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(6) and layer.lora_A.abs().max() > 0


def test_init_is_identity_and_targets():
    model = tiny_vlm()
    base = logits(model)
    wrapped = lora.apply_lora(model, ["lm.attn"], rank=4)
    expected = [f"lm.layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert sorted(wrapped) == sorted(expected)
    assert torch.equal(logits(model), base)   # B = 0: exactly the base model
    model2 = tiny_vlm()
    assert len(lora.apply_lora(model2, ["lm"], rank=2)) == 2 * 7
    assert lora.apply_lora(tiny_vlm(), ["vision"], rank=2) == ["vision.layers.0.self_attn.q_proj",
                                                                "vision.layers.0.self_attn.k_proj",
                                                                "vision.layers.0.self_attn.v_proj",
                                                                "vision.layers.0.self_attn.out_proj",
                                                                "vision.layers.0.fc1", "vision.layers.0.fc2"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.apply_lora(tiny_vlm(), ["lm.nothing"], rank=2)


def test_merge_equals_unmerged_and_disabled_equals_base(tmp_path):
    model = tiny_vlm()
    base = logits(model)
    lora.apply_lora(model, ["lm", "vision"], rank=4, alpha=8)
    randomize_adapters(model)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-2                       # the adapters do something
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)                        # back on after the context
    with lora.merged(model):
        assert not lora.has_lora(model)
        assert torch.allclose(logits(model), adapted, atol=1e-5)
    assert lora.has_lora(model) and torch.equal(logits(model), adapted)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.allclose(logits(model), adapted, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert torch.allclose(logits(VLM.from_pretrained(tmp_path)), adapted, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_only_adapters_train(optimizer):
    model = tiny_vlm().train()
    args = argparse.Namespace(lora_rank=4, lora_alpha=None, lora_targets=["lm"], seed=0, lr_vision=0.0,
                              lr_projector=0.0, lr_lm=1e-2, weight_decay=0.1, optimizer=optimizer)
    opt = make_vlm_optimizer(setup_trainable(model, args), args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, pix = inputs(model)
    for _ in range(2):   # two steps: after the first B != 0, so A gets a gradient too
        loss = model(ids, pix, labels=ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == lora.is_adapter(n), n


@pytest.mark.slow
def test_lora_sft_checkpoint_is_plain_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file
    from test_train_vlm import run
    common = ["train_sft.py", "--data-dir", str(tmp_path / "data"), "--n-synthetic", "40", "--batch-size", "2",
              "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "1000", "--eval-answers", "0",
              "--device", "cpu", "--lora-rank", "4", "--lora-targets", "lm.attn", "lm.mlp"]
    run(common + ["--out-dir", str(tmp_path / "straight")])
    run(common + ["--out-dir", str(tmp_path / "resumed"), "--stop-at-step", "2"])
    run(common + ["--out-dir", str(tmp_path / "resumed"), "--resume"])
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora" in k or ".base." in k for k in a)          # merged: the plain VLM's names
    model = VLM.from_pretrained(tmp_path / "straight")                 # and it loads as one
    state = torch.load(tmp_path / "straight" / "train_state.pt", weights_only=False)
    assert len(state["extra"]["lora"]) == 2 * 4 * 7                    # A and B of 7 linears in 4 layers
    assert model.cfg.lm.num_hidden_layers == 4
