"""Qwen2.5-VL through the training scripts, end to end on CPU: train_sft.py with the qwen2.5-vl presets on a tiny
random checkpoint written by transformers in the official layout (full fine-tune, frozen ViT, LoRA), the LoRA-merged
checkpoint read back by transformers with the same logits, two processes == one with accumulation, the
tiny-qwen-vl preset from scratch, sample.py on its checkpoint, --numeric, and train_grpo.py with the OCR rewards."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from conftest import randomize
from test_train_vlm import max_rel_diff, run, weights

MAX_PIXELS = str(28 * 28 * 8)   # at most 8 LM tokens an image: short sequences


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(root): root/data the synthetic data (64 px scenes, OCR strings), root/hub a tiny random Qwen2.5-VL saved by
    transformers with the data's tokenizer, its special ids (image pad, vision start/end) the tokenizer's."""
    from nanovlm.synthetic import ensure_synthetic, synthetic_tokenizer
    root = tmp_path_factory.mktemp("qwenvl")
    ensure_synthetic(str(root / "data"), n_train=40, n_val=50, image_size=64)
    tok = synthetic_tokenizer(str(root / "data"))
    text = dict(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    vision = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=tok.image_pad,
                           video_token_id=len(tok) + 1, vision_start_token_id=tok.vision_start,
                           vision_end_token_id=tok.vision_end, bos_token_id=tok.endoftext, eos_token_id=tok.im_end,
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    randomize(Qwen2_5_VLForConditionalGeneration(cfg), std=0.05).save_pretrained(root / "hub")
    tok.save(str(root / "hub"))
    return root


def first_image(root):
    folder = root / "data" / "images" / "train"
    return str(folder / sorted(os.listdir(folder))[0])


def sft_args(root, out, *extra):
    return ["train_sft.py", "--preset", "qwen2.5-vl-3b", "--model", str(root / "hub"),
            "--data", f"{root}/data/sft_train.json", f"{root}/data/ocr_train.jsonl", "--max-pixels", MAX_PIXELS,
            "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "0", "--eval-answers", "0",
            "--device", "cpu", "--out-dir", str(root / out), *extra]


def changed(a, b, prefix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def transformers_logits(path, model, root):
    """Logits of transformers' model read from `path` and of ours (`model`) on one sample with an image."""
    from nanovlm.data import load_images
    from nanovlm.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(path)
    image = first_image(root)
    images = model.image_processor()
    inputs = load_images([image], images, "test")
    ids, _ = tok.encode_chat([{"role": "user", "content": "<image>\nWhat is it?"}], [images.image_tokens(image)],
                             add_generation_prompt=True, system=model.cfg.system_prompt)
    ids = torch.tensor([ids])
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs,
                     mm_token_type_ids=(ids == tok.image_pad).int()).logits   # transformers 5: where the images are
        ours = model(ids, **inputs)
    return theirs[0], ours[0]


@pytest.mark.slow
def test_sft_full_frozen_vit_and_lora(hub):
    """Each recipe trains what it says; the checkpoints are in the hub layout (the same tensor names as the
    official file), Qwen25VL.from_pretrained reads them, and transformers reads the LoRA-merged one with our
    logits."""
    from nanovlm.qwen2_5_vl import Qwen25VL
    base = load_file(hub / "hub" / "model.safetensors")
    run(sft_args(hub, "full"))
    run(sft_args(hub, "frozen", "--lr-vision", "0"))
    run(sft_args(hub, "lora", "--lr-vision", "0", "--lr-projector", "1e-3", "--lr-lm", "1e-3", "--lora-rank", "8",
                 "--lora-alpha", "32", "--lora-targets", "lm", "projector"))
    full, frozen, lora = (weights(hub / d) for d in ("full", "frozen", "lora"))
    for w in (full, frozen, lora):
        assert w.keys() == base.keys()                                # the official names, LoRA merged
    assert changed(base, full, "visual.blocks.") and changed(base, full, "visual.merger.")
    assert changed(base, full, "model.language_model.layers.") or changed(base, full, "model.layers.")
    assert not changed(base, frozen, "visual.blocks.") and not changed(base, frozen, "visual.patch_embed.")
    assert changed(base, frozen, "visual.merger.")
    assert not changed(base, lora, "visual.blocks.") and changed(base, lora, "visual.merger.")
    emb = next(k for k in base if k.endswith("embed_tokens.weight"))
    assert torch.equal(base[emb], lora[emb])                          # LoRA adapts linear layers only
    assert max_rel_diff(lora, base) > 1e-4
    config = json.loads((hub / "lora" / "config.json").read_text())
    assert config["nanovlm"]["max_pixels"] == int(MAX_PIXELS)        # sampling uses the trained range
    assert (hub / "lora" / "tokenizer.json").exists() and (hub / "lora" / "train_state.pt").exists()
    model = Qwen25VL.from_pretrained(hub / "lora")
    assert model.cfg.max_pixels == int(MAX_PIXELS) and model.cfg.system_prompt == "You are a helpful assistant."
    theirs, ours = transformers_logits(hub / "lora", model, hub)
    assert (theirs - ours).abs().max() <= 1e-4


@pytest.mark.slow
def test_two_processes_equal_accumulation(hub):
    """The loss is normalised by the global batch's labelled tokens: 2 processes == 1 with 2 micro-batches."""
    run(sft_args(hub, "accum", "--batch-size", "1", "--grad-accum", "2", "--lr-vision", "1e-3"))
    run(sft_args(hub, "ddp", "--batch-size", "1", "--grad-accum", "1", "--lr-vision", "1e-3"), nproc=2)
    a, b = weights(hub / "accum"), weights(hub / "ddp")
    assert max_rel_diff(a, b) <= 1e-5
    assert changed(load_file(hub / "hub" / "model.safetensors"), b, "visual.blocks.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-qwen-vl SFT run (a few steps, from scratch)."""
    d = tmp_path_factory.mktemp("tinyqwen")
    out = run(["train_sft.py", "--preset", "tiny-qwen-vl", "--n-synthetic", "40", "--batch-size", "4",
               "--max-steps", "3", "--warmup-steps", "1", "--eval-answers", "4", "--data-dir", str(d / "data"),
               "--out-dir", str(d / "sft"), "--device", "cpu"])
    return d, out


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_sample(tiny, capsys):
    """tiny-qwen-vl trains from scratch: the synthetic 96 px scenes at 84x84, 3x3 = 9 LM tokens; its checkpoint
    answers through sample.py (--image/--prompt and --eval), as greedy decoding without a cache does."""
    import sample
    from conftest import greedy_by_full_forward
    from nanovlm.data import load_images
    from nanovlm.qwen2_5_vl import Qwen25VL
    from nanovlm.tokenizer import Tokenizer
    d, printed = tiny
    assert "held-out answers" in printed and "9-9 tokens per image" not in printed
    model = Qwen25VL.from_pretrained(d / "sft")
    tok = Tokenizer.from_dir(d / "sft")
    assert model.cfg.stop_token_ids == (tok.im_end, tok.endoftext) and model.cfg.system_prompt is None
    images = model.image_processor()
    image = first_image(d)
    assert Image.open(image).size == (96, 96) and images.image_tokens(image) == 9
    sample.main(["--ckpt", str(d / "sft"), "--image", image, "--prompt", "What shape is in the top left?",
                 "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    inputs = load_images([image], images, "x")
    ids, _ = tok.encode_chat([{"role": "user", "content": "<image>\nWhat shape is in the top left?"}], [9],
                             add_generation_prompt=True, system=None)

    class Logits(torch.nn.Module):   # greedy_by_full_forward's interface: model(ids, pixels)["logits"]
        cfg = model.cfg

        def forward(self, x, pixels):
            return {"logits": model(x, **pixels)}
    tokens = greedy_by_full_forward(Logits(), ids, inputs, 5)
    assert out == tok.decode(tokens, skip_special_tokens=True) + "\n"
    sample.main(["--ckpt", str(d / "sft"), "--eval", str(d / "data" / "sft_val.json"), "--limit", "3",
                 "--device", "cpu"])
    assert "all" in capsys.readouterr().out


@pytest.mark.slow
def test_numeric_head_on_qwen_vl(tiny, capsys):
    """--numeric on a Qwen2.5-VL checkpoint: a new head (the shared numeric.py code), trained, saved beside the
    hub-layout tensors (transformers skips them), and sampled."""
    import sample
    from nanovlm.numeric import NumericQwen25VL
    d, _ = tiny
    count = d / "count.json"
    folder = d / "data" / "images" / "train"
    rows = [{"image": str(folder / name), "conversations": [
        {"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": f"<num><{i % 4}>"}]}
        for i, name in enumerate(sorted(os.listdir(folder))[:8])]
    count.write_text(json.dumps(rows))
    run(["train_sft.py", "--preset", "tiny-qwen-vl", "--init-from", str(d / "sft"), "--numeric", "--data", str(count),
         "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "0", "--eval-answers", "0", "--data-dir",
         str(d / "data"), "--out-dir", str(d / "numeric"), "--device", "cpu"])
    model = NumericQwen25VL.from_pretrained(d / "numeric")
    assert isinstance(model, NumericQwen25VL)
    tensors = load_file(d / "numeric" / "model.safetensors")
    assert any(k.startswith("numeric.") for k in tensors) and any(k.startswith("visual.") for k in tensors)
    before = load_file(d / "sft" / "model.safetensors")
    assert changed(before, tensors, "model.") or changed(before, tensors, "lm_head")
    sample.main(["--ckpt", str(d / "numeric"), "--image", rows[0]["image"], "--prompt", "How many shapes?",
                 "--max-new-tokens", "4", "--device", "cpu"])
    assert "answer:" in capsys.readouterr().out


@pytest.mark.slow
def test_grpo_with_ocr_rewards(tiny):
    """train_grpo.py on the tiny-qwen-vl checkpoint: two steps with the weighted-CER OCR and format rewards."""
    d, _ = tiny
    run(["train_grpo.py", "--preset", "tiny-qwen-vl", "--init-from", str(d / "sft"), "--data-dir", str(d / "data"),
         "--max-steps", "2", "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "6",
         "--warmup-steps", "0", "--reward-funcs", "ocr", "format", "--eval-answers", "0", "--device", "cpu",
         "--out-dir", str(d / "grpo")])
    rows = [json.loads(line) for line in open(d / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward" in r] == [0, 1]
    assert "reward_ocr" in rows[0] and "reward_format" in rows[0]
    a, b = load_file(d / "sft" / "model.safetensors"), load_file(d / "grpo" / "model.safetensors")
    assert changed(a, b, "model.") and not changed(a, b, "visual.")


@pytest.mark.slow
def test_fsdp_with_text_only_samples_equals_one_process_and_resumes(hub, tmp_path):
    """The 7B recipe's --fsdp on 2 gloo processes (the vision blocks and LM layers sharded), with text-only samples
    in the mix (a process whose micro-batch has no image runs a blank one through the sharded tower), trains what
    one process trains with 2 micro-batches, writes the hub layout, answers the held-out questions with every
    process taking part, and --resume from its sharded state continues exactly."""
    from nanovlm.qwen2_5_vl import Qwen25VL
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {i}."},
                                                          {"from": "gpt", "value": f"{i}"}]}) + "\n" for i in range(20)))
    common = ["train_sft.py", "--preset", "qwen2.5-vl-7b", "--model", str(hub / "hub"), "--data",
              f"{hub}/data/sft_train.json", str(text), "--val-data", f"{hub}/data/sft_val.json", "--max-pixels",
              MAX_PIXELS, "--batch-size", "1", "--max-steps", "3", "--warmup-steps", "0", "--lr-vision", "1e-3",
              "--lr-projector", "1e-3", "--lr-lm", "1e-3", "--device", "cpu"]
    one = run(common + ["--grad-accum", "2", "--eval-answers", "5", "--out-dir", str(tmp_path / "one")])
    sharded = run(common + ["--grad-accum", "1", "--fsdp", "--eval-answers", "5", "--out-dir",
                            str(tmp_path / "fsdp")], nproc=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    assert a.keys() == load_file(hub / "hub" / "model.safetensors").keys()
    assert max_rel_diff(a, b) <= 1e-5
    report = lambda out: out[out.index("question type"):out.index("checkpoint:")]
    assert sharded.count("question type") == 1 and report(sharded) == report(one)
    Qwen25VL.from_pretrained(tmp_path / "fsdp")
    resumed = ["--grad-accum", "1", "--fsdp", "--eval-answers", "0", "--out-dir", str(tmp_path / "resumed")]
    run(common + resumed + ["--stop-at-step", "2"], nproc=2)
    run(common + resumed + ["--resume"], nproc=2)
    assert max_rel_diff(b, weights(tmp_path / "resumed")) == 0


def tiny_qwen_vl():
    """(a tiny random Qwen2.5-VL with windowed and full vision blocks, 3 prompts, their images: one dict each):
    two images of different sizes and a text-only prompt."""
    import numpy as np

    from nanovlm.qwen2 import Qwen2Config
    from nanovlm.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionConfig, preprocess_images
    torch.manual_seed(0)
    cfg = Qwen25VLConfig(lm=Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2),
                         vision=VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                                             out_hidden_size=32, window_size=56, fullatt_block_indexes=(1,)),
                         mrope_section=(2, 1, 1), image_token_id=60, vision_start_token_id=58, vision_end_token_id=59,
                         stop_token_ids=(62, 61), pad_token_id=0)
    model = randomize(Qwen25VL(cfg), std=0.2)
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for (w, h), text in (((84, 56), [1, 2]), ((56, 112), [4])):
        pv, grid = preprocess_images([Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))])
        images.append({"pixel_values": pv, "image_grid_thw": grid})
        prompts.append(text + [58] + [60] * model.image_tokens(grid)[0] + [59, 3, 5])
    images.append({"pixel_values": torch.zeros(0, 1176), "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)})
    prompts.append([8, 9, 10])
    return model, prompts, images


def test_gradient_checkpointing_gives_the_same_gradients():
    """--grad-checkpointing on Qwen2.5-VL (its vision blocks take the windows as a non-tensor argument): the same
    gradients, less kept for the backward pass."""
    from nanovlm import train_utils as tu
    from nanovlm.data import collate

    def grads(checkpointed):
        model, prompts, images = tiny_qwen_vl()
        if checkpointed:
            tu.checkpoint_blocks([*model.vision.layers, *model.lm.layers])
        batch = collate([dict(input_ids=torch.tensor(p), labels=torch.tensor(p), images=x, where="x")
                         for p, x in zip(prompts, images)], pad_id=0)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                         batch["attention_mask"], labels=batch["labels"])["loss"]
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, sum(saved)
    (plain, kept_plain), (ckpt, kept_ckpt) = grads(False), grads(True)
    assert kept_ckpt < kept_plain / 2
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_grpo_logps_with_mrope_equal_full_forwards():
    """GRPO on Qwen2.5-VL: the rollout's completion log-probs, from one padded pass (completion_logps) and from the
    prompts once + a KV cache whose positions carry the MRoPE offsets (shared_prompt_logps), equal log_softmax of
    a full forward of each prompt + completion alone, values and gradients (the vision tower's too). Two images of
    different sizes and a text-only prompt: each row's text after its image sits at its own position offset."""
    from nanovlm import grpo
    model, prompts, images = tiny_qwen_vl()
    G, T = 3, 0.8
    batch = grpo.rollout(model, prompts, images, G, 5, T, generator=torch.Generator().manual_seed(0))
    logps = grpo.completion_logps(model, batch, T)
    shared = grpo.shared_prompt_logps(model, dict(batch, prompts=prompts, prompt_images=images), T)
    weights = torch.randn(shared.shape, generator=torch.Generator().manual_seed(1))
    (shared * weights * batch["completion_mask"]).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for b, comp in enumerate(batch["completions"]):
        p, inputs = prompts[b // G], images[b // G]
        ref = torch.log_softmax(model(torch.tensor([p + comp]), **inputs)[0] / T, dim=-1)   # (len, vocab)
        expected = torch.stack([ref[len(p) - 1 + j, t] for j, t in enumerate(comp)])
        assert torch.allclose(logps[b, :len(comp)], expected.detach(), atol=1e-5), b
        assert torch.allclose(shared[b, :len(comp)], expected.detach(), atol=1e-5), b
        total = total + (expected * weights[b, :len(comp)]).sum()
    total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("vision."))


@pytest.mark.slow
def test_lora_run_resumes_exactly(hub):
    """--resume of a LoRA run: the hub-layout model.safetensors (merged) loads back through the name map, the
    adapters and optimizer from train_state.pt, and the run continues as if never stopped."""
    lora = ["--lr-vision", "0", "--lr-projector", "1e-3", "--lr-lm", "1e-3", "--lora-rank", "4", "--lora-targets",
            "lm", "projector", "--max-steps", "3"]
    run(sft_args(hub, "straight", *lora))
    run(sft_args(hub, "resumed", *lora, "--stop-at-step", "2"))
    run(sft_args(hub, "resumed", *lora, "--resume"))
    assert max_rel_diff(weights(hub / "straight"), weights(hub / "resumed")) == 0


def test_token_logps_in_chunks_equal_one_pass():
    """grpo.token_logps makes the logits a few rows at a time (recomputed in the backward pass): log-probs,
    entropies and gradients as from all the logits at once, by hand."""
    from nanovlm import grpo
    model, _, _ = tiny_qwen_vl()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, 32, generator=g, requires_grad=True)
    tokens = torch.randint(0, 64, (5, 3), generator=g)
    w = torch.randn(5, 3, generator=g)
    logits = model.lm.logits(h).float() / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    want_grads = torch.autograd.grad((want * w).sum(), [h, model.lm.embed_tokens.weight])
    p = torch.softmax(logits, -1)
    want_entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    logps, entropy = grpo.token_logps(model, h, tokens, 0.7, with_entropy=True, chunk_bytes=4 * 3 * 64 * 2)  # 2 rows
    grads = torch.autograd.grad((logps * w).sum(), [h, model.lm.embed_tokens.weight])
    assert torch.allclose(logps, want, atol=1e-6) and torch.allclose(entropy, want_entropy.detach(), atol=1e-5)
    assert not entropy.requires_grad
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, atol=1e-6)
