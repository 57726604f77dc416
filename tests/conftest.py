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
