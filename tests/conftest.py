import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts at the repo root (train_*.py, sample.py) import as modules
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_models import PeakMemory, randomize  # noqa: E402,F401  (one copy, shared with the benchmark)
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy_by_full_forward(model, prompt, pixels, n):
    """Reference decoding for VLM.generate, without a KV cache: each step runs the whole sequence and takes the
    argmax of the last logits (never the image-pad, which generate never emits), until a stop token."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), pixels)["logits"][0, -1]
        logits[model.cfg.image_token_id] = float("-inf")
        nxt = int(logits.argmax())
        if nxt in model.cfg.stop_token_ids:
            break
        seq.append(nxt)
    return seq[len(prompt):]


# The tiny VLM the unit tests share: a 2-layer Qwen2 (32 wide, 4 query / 2 kv heads) reading 32x32 images through
# a 2-layer SigLIP (8x8 patches, 24 wide) and a pixel shuffle of 2: 4 image tokens an image. Image-pad id 5, stop 3.
TINY_LM = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4)


def tiny_config(lm=None, vision=None, projector=None, **kw):
    """VLMConfig of the tiny test VLM; lm / vision / projector: dicts of fields to change, kw: VLMConfig fields."""
    from nanovlm.projector import ProjectorConfig
    from nanovlm.qwen2 import Qwen2Config
    from nanovlm.siglip import SiglipConfig
    from nanovlm.vlm import VLMConfig
    return VLMConfig(lm=Qwen2Config(**{**TINY_LM, **(lm or {})}), vision=SiglipConfig(**{**TINY_VISION, **(vision or {})}),
                     projector=ProjectorConfig(**{"shuffle_factor": 2, **(projector or {})}),
                     **{"image_token_id": 5, "stop_token_ids": (3,), "pad_token_id": 0, **kw})


# The bad-input tests' shared pieces (tests/test_bad_inputs.py, tests/test_bad_runs.py): a small tokenizer and
# files written into tmp_path.
@pytest.fixture(scope="module")
def tok():
    from nanovlm.tokenizer import train_tiny_tokenizer
    return train_tiny_tokenizer(["Describe the image. A red circle. What is written? hello there"] * 20, 300)


def write(path, text):
    Path(path).write_text(text, encoding="utf-8")
    return str(path)


def chat(*turns):
    """A role/content record: chat("user", "hi", "assistant", "hello")."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2])]})


def tiny_vlm():
    """A smaller tiny VLM (one layer each side, 16x16 images) with its ids at the top of a 64-token vocabulary."""
    from nanovlm.vlm import VLM
    cfg = tiny_config(lm=dict(vocab_size=64, num_hidden_layers=1),
                      vision=dict(image_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2),
                      projector=dict(shuffle_factor=1), image_token_id=63, stop_token_ids=(62,), pad_token_id=61)
    return VLM(cfg)
