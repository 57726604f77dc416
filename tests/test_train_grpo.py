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
    shared = grpo.shared_prompt_logps(model, dict(batch, prompts=prompts, prompt_images=per_prompt(pix, n_img)), T)
    for b, (p, comp) in enumerate(zip(rows, batch["completions"])):
        k = b // G
        img = pix[k:k + 1] if n_img[k] else None
        with torch.no_grad():
            full = model(torch.tensor([p + comp]), img)["logits"][0]          # (len, vocab), no padding
        ref = torch.log_softmax(full / T, dim=-1)
        expected = torch.stack([ref[len(p) - 1 + j, t] for j, t in enumerate(comp)])
        assert torch.allclose(logps[b, :len(comp)], expected, atol=1e-5), b
        assert torch.allclose(shared[b, :len(comp)], expected, atol=1e-5), b


def test_shared_prompt_gradients_equal_one_row_per_completion():
    """The prompt's keys and values, computed once and repeated G times, pass back the sum of the G rows' gradients:
    the same gradient as a full forward of every prompt + completion on its own (the ViT, the projector, all)."""
    model = biased(tiny_vlm())
    prompts, pix, n_img = prompts_and_pixels(model)
    G, T = 3, 0.9
    batch = grpo.rollout(model, prompts, per_prompt(pix, n_img), G, 4, T, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(2))
    shared = grpo.shared_prompt_logps(model, dict(batch, prompts=prompts, prompt_images=per_prompt(pix, n_img)), T)
    (shared * weights * batch["completion_mask"]).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for b, comp in enumerate(batch["completions"]):                 # one plain forward per completion
        k = b // G
        p = prompts[k]
        logits = model(torch.tensor([p + comp]), pix[k:k + 1] if n_img[k] else None)["logits"][0] / T
        ref = torch.log_softmax(logits, dim=-1)
        total = total + sum(ref[len(p) - 1 + j, t] * weights[b, j] for j, t in enumerate(comp))
    total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("vision.")) # the images learn too


def test_rollout_refuses_greedy():
    model = tiny_vlm()
    prompts, pix, n_img = prompts_and_pixels(model)
    with pytest.raises(ValueError, match="temperature"):
        grpo.rollout(model, prompts, per_prompt(pix, n_img), 2, 4, 0.0)


def test_split_turns_and_prompt_suffix():
    import train_grpo
    conv = {"where": "a.json:3", "images": ["x.png"], "qtype": "count", "messages": [
        {"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "top left"}]}
    one, two = train_grpo.split_turns(conv)
    assert one["messages"] == conv["messages"][:2] and one["where"] == "a.json:3 turn 1"
    assert two["messages"] == [{"role": "user", "content": "<image>\nWhere is it?"},
                               {"role": "assistant", "content": "top left"}]
    assert two["images"] == ["x.png"] and two["where"] == "a.json:3 turn 2" and two["qtype"] == "count"
    late = dict(conv, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"},
                                {"role": "user", "content": "<image>\nAnd?"}, {"role": "assistant", "content": "no"}])
    with pytest.raises(ValueError, match="a.json:3: --split-turns needs every image in the first question"):
        train_grpo.split_turns(late)
    suffixed = train_grpo.with_suffix(two, " Think first.")
    assert suffixed["messages"][0]["content"] == "<image>\nWhere is it? Think first."
    assert two["messages"][0]["content"] == "<image>\nWhere is it?"                  # the original is untouched


def test_keep_groups_drops_flat_groups_and_keeps_the_rest_as_they_were():
    """Two rollout batches of 3 prompts x G=2: groups with equal rewards are dropped, the first `limit` of the
    others are rebuilt into one batch whose rows are the kept rows unchanged (ids, masks, images, advantages)."""
    import train_grpo
    model = tiny_vlm()
    prompts, pix, n_img = prompts_and_pixels(model)
    G, batches = 2, []
    for seed, r in ((0, [1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), (1, [0.0, 0.0, 0.2, 0.7, 1.0, 0.0])):
        b = grpo.rollout(model, prompts, per_prompt(pix, n_img), G, 4, 1.0, generator=torch.Generator().manual_seed(seed))
        b.update(rewards=torch.tensor(r), advantages=grpo.group_advantages(torch.tensor(r), G), texts=list("abcdef"),
                 per_function={"exact": r}, prompts=prompts, prompt_images=per_prompt(pix, n_img),
                 solutions=["s0", "s1", "s2"], questions=["q0", "q1", "q2"],
                 where=["w0", "w1", "w2"])
        batches.append(b)
    kept = train_grpo.keep_groups(batches, G, limit=2, pad_id=model.cfg.pad_token_id)
    # informative: batch 0 group 1 (0, 1), batch 1 group 1 (0.2, 0.7), batch 1 group 2 (1, 0); limit 2 keeps two
    rows = [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert kept["rewards"].tolist() == pytest.approx([0.0, 1.0, 0.2, 0.7])
    assert kept["where"] == ["w1", "w1"]
    assert kept["questions"] == ["q1", "q1"] and kept["texts"] == ["c", "d", "c", "d"]
    assert [torch.equal(x["pixel_values"], pix[1:2]) for x in kept["prompt_images"]] == [True, True]
    assert torch.equal(kept["images"]["pixel_values"], torch.cat([pix[1:2]] * 2 * G))
    for i, (k, r) in enumerate(rows):
        b = batches[k]
        n = int(b["attention_mask"][r].sum())
        assert kept["input_ids"][i, :n].tolist() == b["input_ids"][r, :n].tolist()
        assert kept["completions"][i] == b["completions"][r] and kept["advantages"][i] == b["advantages"][r]
    assert train_grpo.keep_groups(batches[:1], G, limit=0, pad_id=0) is None


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


@pytest.mark.slow
def test_system_suffix_dynamic_sampling_and_logged_completions(sft):
    """--system reaches the prompts and the saved checkpoint; --prompt-suffix the prompts and the held-out
    questions; --log-completions prints N completions with their rewards; --dynamic-sampling trains only on
    groups whose rewards differ (reward_length: completions of different lengths) and counts them."""
    out = run(grpo_args(sft, "flags", "--data", str(sft / "data" / "sft_train.json"), "--split-turns",
                        "--system", "Answer briefly.", "--prompt-suffix", " Answer in <answer></answer>.",
                        "--dynamic-sampling", "3", "--log-completions", "3", "--log-every", "1",
                        "--eval-answers", "2", "--val-data", str(sft / "data" / "sft_val.json")))
    cfg = json.load(open(sft / "flags" / "config.json"))
    assert cfg["system_prompt"] == "Answer briefly."
    logged = [line for line in out.splitlines() if line.startswith("  '")]
    assert len(logged) == 2 * 3                                          # 3 completions at each of the 2 steps
    assert all("Answer in <answer></answer>." in line and "reward_length" in line and "advantage" in line
               for line in logged)
    rows = [json.loads(line) for line in open(sft / "flags" / "metrics.jsonl")]
    train = [r for r in rows if "reward" in r]
    assert all(0 < r["frac_groups_kept"] <= 1 and r["groups_trained"] <= 2 for r in train)
