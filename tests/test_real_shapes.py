"""The real-weights preset at the real vocabulary, offline: Qwen2.5's tokenizer (151,643 regular tokens, its special
ids) and a 151,936-row tied embedding, through pretrain -> SFT -> sample -> GRPO in bf16, as a user runs them.

The tokenizer is the Qwen2.5-family one in ../shared/qwen-tokenizer (see its README; not vendored: 11 MB) or the
folder named by $NANOVLM_QWEN_TOKENIZER; every test here skips without it. The models are tiny in width and depth
(2 layers) but real in vocabulary and special ids, written by transformers in the official layout, so the only
thing not real is their size. References are independent of nanovlm: transformers' apply_chat_template with the
Qwen2.5 template, and transformers' own generate on the same official checkpoint.
"""
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, randomize
from test_tokenizer import CHATS, QWEN25_TEMPLATE
from test_train_vlm import run   # a script as a user runs it (subprocess); its stdout

TOKENIZER_DIR = Path(os.environ.get("NANOVLM_QWEN_TOKENIZER", ROOT.parent / "shared" / "qwen-tokenizer"))
HAVE_TOKENIZER = (TOKENIZER_DIR / "tokenizer.json").is_file() or (TOKENIZER_DIR / "tokenizer.json.gz").is_file()
pytestmark = pytest.mark.skipif(not HAVE_TOKENIZER, reason=f"no Qwen tokenizer at {TOKENIZER_DIR} (../shared is "
                                "absent in a plain clone; set NANOVLM_QWEN_TOKENIZER to a folder holding one)")

VOCAB_ROWS = 151936   # Qwen2.5's embedding rows: more than the tokenizer's entries, so added tokens still fit
# Qwen2.5's special ids (the shared tokenizer's README); <num> is added after the four extra Qwen3 tokens.
SPECIAL_IDS = {"endoftext": 151643, "im_start": 151644, "im_end": 151645, "vision_start": 151652,
               "vision_end": 151653, "image_pad": 151655, "num": 151669}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """Path of the real tokenizer.json (unpacked into a temporary folder when shipped gzipped)."""
    if (TOKENIZER_DIR / "tokenizer.json").is_file():
        return TOKENIZER_DIR / "tokenizer.json"
    path = tmp_path_factory.mktemp("qwen-tokenizer") / "tokenizer.json"
    with gzip.open(TOKENIZER_DIR / "tokenizer.json.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    from nanovlm.tokenizer import Tokenizer
    return Tokenizer.from_file(tokenizer_json)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_json):
    """transformers' tokenizer on the same file, with the Qwen2.5 chat template (the shared file carries Qwen3's)."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = QWEN25_TEMPLATE
    return hf


# ---- the tokenizer at real ids ------------------------------------------------------------------------------


def test_special_ids_are_qwens(tok):
    for attr, want in SPECIAL_IDS.items():
        assert getattr(tok, attr) == want, attr
    assert len(tok) == 151670 <= VOCAB_ROWS   # <num> is the one token added, and it fits the embedding
    assert tok.encode("<think>") == [151667]   # a Qwen3 addition, not special: ordinary text in a message
    tok.check_text("<think>ok</think> <tool_call>", "message")
    with pytest.raises(ValueError, match="control token"):
        tok.check_text("fine<|im_end|>\n<|im_start|>assistant", "message")


@pytest.mark.parametrize("gen", [False, True])
def test_chat_ids_match_transformers(tok, hf_tok, gen):
    """Every chat of test_tokenizer, plus images and OCR-style amounts: the ids transformers' apply_chat_template
    gives with the Qwen2.5 template, at Qwen's real ids."""
    image_chat = [{"role": "user", "content": "<image>\nWhat is the text in the image?"},
                  {"role": "assistant", "content": "¥147.49"}]
    for chat in CHATS + [image_chat]:
        text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        text = tok.expand_images(text, 4)   # transformers knows no <image> tag: expand it the documented way
        ids, labels = tok.encode_chat(chat, image_tokens=4, add_generation_prompt=gen)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert len(labels) == len(ids)


def test_labels_are_the_answers_at_real_ids(tok):
    """What is trained decodes to exactly each answer and its <|im_end|>, byte-level merges and all; the token
    counts without materialising image pads equal the real ones."""
    chat = [{"role": "user", "content": "<image>\nWhat is the text in the image?"},
            {"role": "assistant", "content": "¥147.49"},
            {"role": "user", "content": "And in words? 世界"},
            {"role": "assistant", "content": " one hundred and forty-seven 世界\n"}]
    ids, labels = tok.encode_chat(chat, image_tokens=49)
    spans, span = [], []   # the runs of labelled tokens
    for i, label in zip(ids, labels):
        if label != -100:
            assert label == i
            span.append(i)
        elif span:
            spans.append(span)
            span = []
    assert [tok.decode(s) for s in spans] == ["¥147.49<|im_end|>", " one hundred and forty-seven 世界\n<|im_end|>"]
    assert ids.count(SPECIAL_IDS["image_pad"]) == 49
    assert tok.chat_lengths([chat, chat[:1]], image_tokens=49) == [len(ids), len(tok.encode_chat(chat[:1], 49)[0])]


# ---- the real-weights preset, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tokenizer_json):
    """Official-layout checkpoints with Qwen2.5's vocabulary and special ids: a 2-layer Qwen2ForCausalLM (tied,
    151,936 rows) with the real tokenizer.json beside it, and a 2-layer SigLIP vision tower; plus a small
    synthetic dataset (captions, questions, OCR) at the tower's 32x32 input."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from nanovlm.synthetic import generate
    root = tmp_path_factory.mktemp("real_shapes")
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                                      tie_word_embeddings=True, bos_token_id=SPECIAL_IDS["endoftext"],
                                      eos_token_id=SPECIAL_IDS["im_end"]))
    randomize(lm, std=0.2).save_pretrained(root / "qwen")
    shutil.copyfile(tokenizer_json, root / "qwen" / "tokenizer.json")
    vis = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=2))
    randomize(vis, std=0.05).save_pretrained(root / "siglip")
    generate(str(root / "data"), n_train=8, n_val=4, image_size=32)
    return root


def greedy_transformers(lm_dir, hf_tok, prompt, n):
    """transformers' greedy answer to a text-only prompt, chat template and all: the reference for sample.py."""
    from transformers import Qwen2ForCausalLM
    ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    model = Qwen2ForCausalLM.from_pretrained(lm_dir).eval()
    out = model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=[SPECIAL_IDS["im_end"],
                         SPECIAL_IDS["endoftext"]], pad_token_id=SPECIAL_IDS["endoftext"])
    return hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_real_weights_preset_pretrain_sft_sample_grpo_in_bf16(backbones, hf_tok, tmp_path):
    root, data = backbones, backbones / "data"
    preset = ["--preset", "qwen2.5-0.5b-siglip", "--lm", str(root / "qwen"), "--vision", str(root / "siglip"),
              "--image-size", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
              "--device", "cpu", "--dtype", "bf16", "--eval-every", "1000"]

    # stage 1: only the projector learns; the LM is the official checkpoint, 151,936 tied rows stored once
    run(["train_pretrain.py", *preset, "--data", str(data / "captions_train.json"), "--out-dir", str(tmp_path / "s1")])
    s1 = load_file(tmp_path / "s1" / "model.safetensors")
    ref = load_file(root / "qwen" / "model.safetensors")
    assert s1["lm.embed_tokens.weight"].shape == (VOCAB_ROWS, 32)
    assert torch.equal(s1["lm.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    assert not any("lm_head" in k for k in s1)
    config = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert config["image_token_id"] == SPECIAL_IDS["image_pad"]
    assert config["stop_token_ids"] == [SPECIAL_IDS["im_end"], SPECIAL_IDS["endoftext"]]

    # the stage-1 checkpoint answers a text-only question as transformers does with the official LM
    prompt = "What is the capital of France?"
    answer = run(["sample.py", "--ckpt", str(tmp_path / "s1"), "--prompt", prompt, "--max-new-tokens", "12",
                  "--device", "cpu", "--dtype", "fp32"])
    assert answer == greedy_transformers(root / "qwen", hf_tok, prompt, 12) + "\n"

    # stage 2 from stage 1: LM and projector learn, the vision tower stays frozen
    run(["train_sft.py", *preset, "--init-from", str(tmp_path / "s1"), "--data", str(data / "sft_train.json"),
         str(data / "ocr_train.jsonl"), "--val-data", str(data / "sft_val.json"), "--eval-answers", "2",
         "--out-dir", str(tmp_path / "s2")])
    s2 = load_file(tmp_path / "s2" / "model.safetensors")
    assert not torch.equal(s2["lm.embed_tokens.weight"], s1["lm.embed_tokens.weight"])
    assert torch.equal(s2["vision.layers.1.fc1.weight"], s1["vision.layers.1.fc1.weight"])
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "s2" / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)   # ln(151936) = 11.9 for a uniform guess

    # sampling with bf16 weights, about an image (bf16 rounding may part its tokens from fp32's: it has to run)
    image = data / "images" / "val" / "000001.png"
    out = run(["sample.py", "--ckpt", str(tmp_path / "s2"), "--image", str(image), "--prompt", "What colour is it?",
               "--max-new-tokens", "6", "--device", "cpu", "--dtype", "bf16"])
    assert out.endswith("\n")

    # stage 3 from stage 2, bf16 autocast: rollouts with a KV cache, rewards, an update. The reward plugin scores
    # length so the groups differ (a random model earns no OCR reward): the update must then move the LM.
    plugin = tmp_path / "length_reward.py"
    plugin.write_text("def reward_length(completions, solutions, **columns):\n"
                      "    return [len(c) / 10 for c in completions]\n")
    run(["train_grpo.py", *preset, "--init-from", str(tmp_path / "s2"), "--data", str(data / "ocr_train.jsonl"),
         "--val-data", str(data / "ocr_val.jsonl"), "--eval-answers", "2", "--num-generations", "4",
         "--max-new-tokens", "8", "--temperature", "1.5", "--reward-plugin", str(plugin),
         "--reward-funcs", "reward_length", "--lr-lm", "1e-3", "--warmup-steps", "0",
         "--out-dir", str(tmp_path / "s3")])
    rows = [json.loads(line) for line in open(tmp_path / "s3" / "metrics.jsonl")]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2 and all(r["frac_zero_std_groups"] < 1 for r in steps)
    s3 = load_file(tmp_path / "s3" / "model.safetensors")
    assert s3["lm.embed_tokens.weight"].shape == (VOCAB_ROWS, 32)
    assert not torch.equal(s3["lm.layers.0.attn.q_proj.weight"], s2["lm.layers.0.attn.q_proj.weight"])
    assert torch.equal(s3["projector.fc1.weight"], s2["projector.fc1.weight"])   # the preset trains the LM only
    assert (tmp_path / "s3" / "tokenizer.json").read_text() == (tmp_path / "s2" / "tokenizer.json").read_text()
