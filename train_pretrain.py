"""Stage 1: align the vision features with the language model on image-caption pairs.

With pretrained backbones only the projector learns (the LM and ViT stay frozen), so the LM learns to read
image features without forgetting how to write. The tiny preset trains from scratch, so everything learns.

Offline, on the embedded default (tiny model, synthetic captions generated on first use, CPU):
    python train_pretrain.py
    python train_sft.py --init-from out/pretrain

Real weights (GPUs; LLaVA-CC3M-Pretrain-595K: chat.json + images/):
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset qwen2.5-0.5b-siglip \
        --data chat.json --image-root images/ --out-dir out/pretrain

The loop is train_sft.py's. Ctrl-C saves a checkpoint at the end of the step; add --resume (same flags,
same --out-dir) to continue exactly.
Every flag: python train_pretrain.py --help
"""

import functools

from nanovlm.cli import run_cli
from train_sft import main

if __name__ == "__main__":   # the same loop as stage 2, with stage 1's defaults
    run_cli(functools.partial(main, stage="pretrain", doc=__doc__))
