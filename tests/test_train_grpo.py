"""GRPO rollouts against hand computations (log-probs from a plain full forward, masks from plain generate), and
train_grpo.py end to end on CPU: one process, LoRA with a KL penalty, and 2 processes == 2 micro-batches."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nanovlm import grpo
from nanovlm.data import load_data
from nanovlm.evaluate import evaluate_answers
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM
from test_lora import tiny_vlm
from test_train_vlm import run

STOPS = (62, 61)


def biased(model):
    """Make both stop tokens likely, so a short rollout has rows ending on each and rows cut off."""
    bias = torch.zeros(model.cfg.lm.vocab_size)
    bias[62], bias[61] = 2.5, 1.5
    plain = model.lm.logits
    model.lm.logits = lambda h: plain(h) + bias
    return model


def prompts_and_pixels(model):
    n = model.cfg.image_tokens
    img = model.cfg.image_token_id
    prompts = [[5, 6] + [img] * n + [7], [8] + [img] * n + [9, 10, 11, 12], [13, 14, 15]]   # the last: no image
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return prompts, pixel_values, [1, 1, 0]


def per_prompt(pix, n_img):
    """The images as rollout takes them: one dict of inputs per prompt."""
    blocks = pix.split(n_img)
    return [{"pixel_values": blk} for blk in blocks]


def test_rollout_logps_and_masks_match_hand_computation():
    model = biased(tiny_vlm())
    prompts, pix, n_img = prompts_and_pixels(model)
    G, T, max_new = 4, 0.7, 5
    batch = grpo.rollout(model, prompts, per_prompt(pix, n_img), G, max_new, T, generator=torch.Generator().manual_seed(0))
    # The same sampling through plain generate (both stop tokens stop it, neither is returned).
    rows = [p for p in prompts for _ in range(G)]
    rep_pix = torch.cat([pix[0:1]] * G + [pix[1:2]] * G)
    plain = model.generate(rows, rep_pix, max_new_tokens=max_new, temperature=T,
                           generator=torch.Generator().manual_seed(0))
    assert model.cfg.stop_token_ids == STOPS                      # restored after the rollout
    kinds = set()
    for b, (out, comp) in enumerate(zip(plain, batch["completions"])):
        L = int(batch["completion_mask"][b].sum())
        assert batch["completion_mask"][b, :L].eq(1).all() and batch["completion_mask"][b, L:].eq(0).all()
        assert comp == batch["completion_ids"][b, :L].tolist()
        if len(out) < max_new:                                     # stopped: the stop token is trained, last
            assert comp[:-1] == out and comp[-1] in STOPS and bool(batch["stopped"][b])
            kinds.add(comp[-1])
        else:                                                      # cut off: no stop token anywhere
            assert comp == out and not set(comp) & set(STOPS) and not bool(batch["stopped"][b])
            kinds.add("cut")
    assert kinds == {62, 61, "cut"}, kinds                         # every case was exercised

    logps = grpo.completion_logps(model, batch, T)
    for b, (p, comp) in enumerate(zip(rows, batch["completions"])):
        k = b // G
        img = pix[k:k + 1] if n_img[k] else None
        with torch.no_grad():
            full = model(torch.tensor([p + comp]), img)["logits"][0]          # (len, vocab), no padding
        ref = torch.log_softmax(full / T, dim=-1)
        expected = torch.stack([ref[len(p) - 1 + j, t] for j, t in enumerate(comp)])
        assert torch.allclose(logps[b, :len(comp)], expected, atol=1e-5), b


def test_rollout_refuses_greedy():
    model = tiny_vlm()
    prompts, pix, n_img = prompts_and_pixels(model)
    with pytest.raises(ValueError, match="temperature"):
        grpo.rollout(model, prompts, per_prompt(pix, n_img), 2, 4, 0.0)


# ---------------------------------------------------------------------------------------------- end to end

PLUGIN = '''
def reward_length(completions, solutions, **columns):
    """Longer answers score higher: a signal even an untrained model gets, so the weights move."""
    assert "qtype" in columns and len(columns["qtype"]) == len(completions)
    return [min(len(c), 20) / 20 for c in completions]
'''


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    run(["train_sft.py", "--n-synthetic", "40", "--batch-size", "2", "--max-steps", "2", "--eval-answers", "0",
         "--data-dir", str(d / "data"), "--out-dir", str(d / "sft"), "--device", "cpu"])
    (d / "plugin.py").write_text(PLUGIN)
    return d


def grpo_args(d, out, *extra):
    return ["train_grpo.py", "--init-from", str(d / "sft"), "--data-dir", str(d / "data"), "--max-steps", "2",
            "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "6", "--warmup-steps", "0",
            "--reward-plugin", str(d / "plugin.py"), "--reward-funcs", "ocr", "reward_length",
            "--reward-weights", "1", "1", "--eval-answers", "0", "--device", "cpu", "--out-dir", str(d / out), *extra]


def changed(a, b, prefix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.mark.slow
def test_train_grpo_end_to_end(sft):
    run(grpo_args(sft, "full", "--eval-answers", "4", "--eval-every", "1"))
    rows = [json.loads(line) for line in open(sft / "full" / "metrics.jsonl")]
    train, held_out = [r for r in rows if "reward" in r], [r for r in rows if "val_text" in r]
    assert [r["step"] for r in train] == [0, 1]
    for key in ("reward", "reward_std", "reward_ocr", "reward_reward_length", "frac_zero_std_groups",
                "clip_ratio_region", "completion_length", "entropy", "loss"):
        assert key in train[0], key
    assert [r["step"] for r in held_out] == [0, 1, 2]               # before any update, then after each step
    assert os.path.exists(sft / "full" / "reward.png")
    model = VLM.from_pretrained(sft / "full")                       # a plain VLM checkpoint
    samples = load_data(str(sft / "data" / "ocr_val.jsonl"))
    for ckpt, row in ((sft / "sft", held_out[0]), (sft / "full", held_out[-1])):   # the curve's ends are these models
        report = evaluate_answers(VLM.from_pretrained(ckpt), Tokenizer.from_dir(ckpt), samples, max_new_tokens=6,
                                  limit=4)
        assert report["all"]["text"] == pytest.approx(row["val_text"]), ckpt
    a, b = load_file(sft / "sft" / "model.safetensors"), load_file(sft / "full" / "model.safetensors")
    assert changed(a, b, "lm.") and not changed(a, b, "vision.") and not changed(a, b, "projector.")
    assert model.cfg.image_tokens == 9                             # the tiny preset: 96 px / 16 px patches, shuffle 2


@pytest.mark.slow
def test_train_grpo_lora_with_kl(sft):
    run(grpo_args(sft, "lora", "--lora-rank", "4", "--beta", "0.1", "--num-iterations", "2", "--loss-type", "dapo"))
    rows = [json.loads(line) for line in open(sft / "lora" / "metrics.jsonl")]
    assert all("kl" in r and r["kl"] >= 0 for r in rows)
    a, b = load_file(sft / "sft" / "model.safetensors"), load_file(sft / "lora" / "model.safetensors")
    assert a.keys() == b.keys()                                        # merged: no adapter names
    assert changed(a, b, "lm.layers.") and not changed(a, b, "lm.embed_tokens") and not changed(a, b, "vision.")
    VLM.from_pretrained(sft / "lora")


@pytest.mark.slow
def test_two_processes_equal_two_micro_batches(sft):
    run(grpo_args(sft, "accum", "--batch-size", "1", "--grad-accum", "2"))
    run(grpo_args(sft, "ddp", "--batch-size", "1", "--grad-accum", "1"), nproc=2)
    a, b = load_file(sft / "accum" / "model.safetensors"), load_file(sft / "ddp" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert changed(load_file(sft / "sft" / "model.safetensors"), b, "lm.")
