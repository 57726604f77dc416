"""What the VLM training scripts share: presets, flags, the model, the optimizer, checkpoints, batches.

The loop itself is in train_sft.py, readable top to bottom; train_pretrain.py runs the same loop with stage 1's
defaults, and train_grpo.py uses the pieces below around its own loop. A stage is a column of defaults in
PRESETS:

    stage 1, pretrain: image-caption pairs; with pretrained backbones only the projector learns, so the LM
                       learns to read the image features without forgetting how to write;
    stage 2, sft:      instruction data; the projector and the LM learn, the vision tower stays frozen;
    stage 3, grpo:     reinforcement learning from rewards (train_grpo.py).

Presets:
    tiny                  (default) everything from scratch on the synthetic dataset (generated on first use,
                          nanovlm/synthetic.py), with a byte-level BPE trained on it: runs on a laptop CPU in
                          minutes. Nothing is pretrained, so every part learns in both stages; SFT trains the
                          weight matrices with Muon (muon.py).
    tiny-qwen-vl          the same data and recipe on a tiny Qwen2.5-VL (qwen2_5_vl.py): scenes at 84x84 (6x6
                          patches of 14, 3x3 LM tokens after the 2x2 merge), 2-D RoPE in the ViT, MRoPE in the LM.
    qwen2.5-0.5b-siglip   Qwen/Qwen2.5-0.5B-Instruct + google/siglip-base-patch16-224 from the hub (or local
                          directories via --lm / --vision); --data is required.
    qwen2.5-vl-3b         Qwen/Qwen2.5-VL-3B-Instruct (or a local directory via --model): full fine-tuning, a
    qwen2.5-vl-7b         frozen ViT (--lr-vision 0) or LoRA (--lora-rank); the 7B's full fine-tune with --fsdp.
                          Images at their own size within --min-pixels/--max-pixels; --data is required.
Every preset value is a flag default and can be overridden. Why each tiny default is what it is (the runs that
chose it): docs/experiments.md.

The two model families (the SigLIP VLM, vlm.py, and Qwen2.5-VL, qwen2_5_vl.py) train through the same loop: the
model's image_processor() turns images into its inputs (data.py), and the models take the same calls (forward,
loss_counts, states, generate). Where they differ here: build_model (which model), file_names (a Qwen2.5-VL
checkpoint is in the official hub layout, so transformers and vLLM read it as it is); flops.train_flops counts
what each vision tower computes.
"""

import argparse
import functools
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from nanovlm import fsdp, lora
from nanovlm import train_utils as tu
from nanovlm.data import VLMDataset, collate, load_data, pack
from nanovlm.numeric import NumericConfig, NumericQwen25VL, NumericVLM, WithNumericHead
from nanovlm.projector import ProjectorConfig
from nanovlm.qwen2 import Qwen2Config
from nanovlm.qwen2_5_vl import MAX_PIXELS, MIN_PIXELS, QWEN_VL_SYSTEM, Qwen25VL, Qwen25VLConfig, VisionConfig
from nanovlm.siglip import SiglipConfig
from nanovlm.synthetic import ensure_synthetic, synthetic_tokenizer
from nanovlm.tokenizer import DEFAULT_SYSTEM, Tokenizer
from nanovlm.vlm import VLM, VLMConfig, load_vlm
from nanovlm.weights import resolve_checkpoint

SYNTHETIC = "data/synthetic"
PRESETS = {
    "tiny": {
        "common": dict(data_dir=SYNTHETIC, n_synthetic=20000, image_size=96, patch_size=16, max_length=160,
                       pack=True, batch_size=32, grad_accum=1, warmup_steps=50, weight_decay=0.01, eval_every=250,
                       save_every=500, system=None, optimizer="adamw", min_lr_ratio=0.1),
        "pretrain": dict(data="{data_dir}/captions_train.json", val_data="{data_dir}/captions_val.json",
                         max_steps=1000, lr_vision=5e-4, lr_projector=5e-4, lr_lm=5e-4, out_dir="out/pretrain"),
        # lr 5e-4: at 2e-3 the patch embedding (a LayerNorm follows it) grows under Adam until the position
        # embeddings drown and the ViT loses where things are. SFT mixes in the OCR strings (a third of the
        # samples): reading whole strings trains the ViT to see detail, and the scene questions gain from it.
        # Muon for the weight matrices, cosine to 0 (docs/experiments.md: the runs behind these choices).
        "sft": dict(data=["{data_dir}/sft_train.json", "{data_dir}/ocr_train.jsonl:0.5"],
                    val_data="{data_dir}/sft_val.json", max_steps=2400, lr_vision=3e-4, lr_projector=3e-4,
                    lr_lm=3e-4, optimizer="muon", min_lr_ratio=0.0, out_dir="out/sft"),
        # batch_size counts prompts here (each sampled num_generations times)
        "grpo": dict(init_from="out/sft", data="{data_dir}/ocr_train.jsonl", val_data="{data_dir}/ocr_val.jsonl",
                     max_steps=200, batch_size=8, warmup_steps=10, eval_every=25, save_every=50, lr_vision=0.0,
                     lr_projector=0.0, lr_lm=1e-4, max_new_tokens=24, num_generations=8, reward_funcs=["ocr"],
                     out_dir="out/grpo"),
    },
    # 16k tokens per micro-batch and GPU: the 0.5B LM's AdamW state is ~8 GB and its bf16 activations ~1.2 MB a
    # token (24 layers), ~20 GB at 16k tokens, so an 80 GB GPU has room to spare (benchmarks/gpu_check.py measures
    # the peak). On 8 GPUs a step is ~130k tokens, about a LLaVA global batch of 128 conversations.
    "qwen2.5-0.5b-siglip": {
        "common": dict(lm="Qwen/Qwen2.5-0.5B-Instruct", vision="google/siglip-base-patch16-224", image_size=224,
                       max_length=1024, pack=True, batch_size=8, grad_accum=1, warmup_steps=100, weight_decay=0.0,
                       eval_every=500, save_every=1000, system=DEFAULT_SYSTEM, optimizer="adamw",
                       min_lr_ratio=0.1),
        "pretrain": dict(max_steps=5000, batch_tokens=16384, lr_vision=0.0, lr_projector=1e-3, lr_lm=0.0,
                         out_dir="out/pretrain"),
        "sft": dict(max_steps=5000, batch_tokens=16384, lr_vision=0.0, lr_projector=1e-4, lr_lm=2e-5,
                    out_dir="out/sft"),
        "grpo": dict(max_steps=1000, batch_size=4, grad_accum=1, warmup_steps=20, save_every=100, lr_vision=0.0,
                     lr_projector=0.0, lr_lm=1e-6, max_new_tokens=256, num_generations=8,
                     reward_funcs=["ocr", "format"], out_dir="out/grpo"),
    },
}
# Qwen2.5-VL from the hub. Learning rates as Qwen2-VL fine-tuning commonly uses them: LM and merger 1e-5, the ViT
# 2e-6. Memory (estimated from the layer sizes, not measured): bf16 activations are ~4 MB a token for the 3B (36
# layers of 2048) and ~6 MB for the 7B (28 of 3584), so 8k tokens a micro-batch need 35-45 GB; full fine-tuning adds
# 16 bytes a parameter (60 GB for the 3B, 133 GB for the 7B): --fsdp shards that over the GPUs, and
# --grad-checkpointing cuts the activations ~10x. A LoRA run or a frozen ViT needs far less.
QWEN_VL = {
    "common": dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_length=2048, pack=True, batch_size=4,
                   grad_accum=1, warmup_steps=50, weight_decay=0.0, eval_every=500, save_every=500,
                   system=QWEN_VL_SYSTEM, optimizer="adamw", min_lr_ratio=0.1),
    "pretrain": dict(max_steps=2000, batch_tokens=8192, lr_vision=0.0, lr_projector=1e-5, lr_lm=0.0,
                     out_dir="out/pretrain"),
    "sft": dict(max_steps=2000, batch_tokens=8192, lr_vision=2e-6, lr_projector=1e-5, lr_lm=1e-5, out_dir="out/sft"),
    "grpo": dict(max_steps=500, batch_size=4, grad_accum=1, warmup_steps=20, save_every=100, lr_vision=0.0,
                 lr_projector=0.0, lr_lm=1e-6, max_new_tokens=256, num_generations=8, reward_funcs=["ocr", "format"],
                 out_dir="out/grpo"),
}
PRESETS["qwen2.5-vl-3b"] = {**QWEN_VL, "common": dict(QWEN_VL["common"], model="Qwen/Qwen2.5-VL-3B-Instruct")}
PRESETS["qwen2.5-vl-7b"] = {**QWEN_VL, "common": dict(QWEN_VL["common"], model="Qwen/Qwen2.5-VL-7B-Instruct")}
# The tiny default's data and recipe on a tiny Qwen2.5-VL: the synthetic 96x96 scenes resized to 84x84 (the
# largest multiple of 28 that fits max_pixels), 6x6 patches of 14 pixels, 3x3 LM tokens after the 2x2 merge: one
# per cell of the scenes' grid, as the tiny default has. Its own output directories, so both can be trained.
PRESETS["tiny-qwen-vl"] = {
    "common": dict({k: v for k, v in PRESETS["tiny"]["common"].items() if k != "patch_size"}, max_pixels=84 * 84),
    "pretrain": dict(PRESETS["tiny"]["pretrain"], out_dir="out/pretrain-qwen-vl"),
    "sft": dict(PRESETS["tiny"]["sft"], out_dir="out/sft-qwen-vl"),
    "grpo": dict(PRESETS["tiny"]["grpo"], init_from="out/sft-qwen-vl", out_dir="out/grpo-qwen-vl"),
}
NUMERIC_DEFAULTS = dict(numeric_hidden=512, numeric_transform="symlog")   # a new numeric head (--numeric)
# The tiny model: ~2M parameters; 96x96 images, 16x16 patches -> 6x6 patches -> pixel shuffle 2 -> 3x3 = 9 image
# tokens, one per cell of the synthetic scenes' 3x3 grid (so no cell is split across tokens).
TINY_LM = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
# tiny-qwen-vl's tower, as wide and deep as TINY_VISION with about as many parameters (SwiGLU has three matrices
# to the MLP's two, so 2/3 of the width). The real models' 112-pixel windows cover a whole 84x84 image, so every
# block sees the whole image, as SigLIP's do; the last block is a full-attention one, as every 4th is in the real
# towers. The LM is TINY_LM with the real models' MRoPE split (16, 24, 24 of 64) scaled to its 16 frequencies.
TINY_QWEN_VISION = dict(depth=4, hidden_size=128, intermediate_size=344, num_heads=4, out_hidden_size=128,
                        window_size=112, fullatt_block_indexes=(3,))
TINY_MROPE = (4, 6, 6)


def build_parser(doc, stage):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(stage=stage)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="defaults for every flag left unset")
    p.add_argument("--out-dir", help="checkpoint, metrics.jsonl and plots go here")
    p.add_argument("--init-from", help="start from this VLM checkpoint directory (weights only)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir exactly where its checkpoint stopped")

    a = p.add_argument_group("data").add_argument
    a("--data", nargs="+", help="training data: PATH[:WEIGHT] ... (JSON/JSONL; LLaVA, role/content or OCR records)")
    a("--val-data", help="validation data file")
    a("--image-root", help="image paths in the data are relative to this (default: each data file's folder)")
    a("--data-dir", help="where the tiny preset writes its synthetic dataset")
    a("--n-synthetic", type=int, help="training images of the synthetic dataset (validation: 1/20 of it)")
    a("--max-length", type=int, help="longest sample in tokens; longer ones are an error (see --drop-long)")
    a("--drop-long", action="store_true", help="drop (and count) samples longer than --max-length")
    a("--pack", action=argparse.BooleanOptionalAction, help="pack several samples into each row of up to "
      "--max-length tokens (attention kept within each sample) instead of padding every row to the longest: "
      "same loss, less wasted compute when lengths differ")
    a("--group-by-length", action="store_true", help="batch samples of similar length together (less padding; "
      "off by default: batches of one kind learnt slower on the tiny default, docs/experiments.md)")
    a("--system", help="system prompt (preset default); 'none' for no system turn")

    a = p.add_argument_group("model").add_argument
    a("--lm", help="LM checkpoint dir or hub id (the qwen2.5-0.5b-siglip preset)")
    a("--vision", help="vision checkpoint dir or hub id (the qwen2.5-0.5b-siglip preset)")
    a("--model", help="Qwen2.5-VL checkpoint dir or hub id (the qwen2.5-vl presets)")
    a("--image-size", type=int, help="the SigLIP VLM's input size; tiny presets: the synthetic images' size")
    a("--patch-size", type=int, help="tiny preset: the ViT's patch side in pixels (a pretrained tower has its own)")
    a("--min-pixels", type=int, help="Qwen2.5-VL: images smaller than this many pixels are scaled up (default 56*56)")
    a("--max-pixels", type=int, help="Qwen2.5-VL: images larger than this many pixels are scaled down (default "
      "28*28*1280, 1280 tokens): the knob between detail and sequence length")
    a("--slot-embedding", action="store_true", help="a new projector adds a learned vector per image token, "
      "telling the LM where in the image the token comes from (projector.py; off by default, docs/experiments.md)")

    a = p.add_argument_group("optimisation").add_argument
    a("--max-steps", type=int)
    a("--batch-size", type=int, help="samples per micro-batch per process")
    a("--batch-tokens", type=int, help="instead of --batch-size: as many samples per micro-batch as fit this many "
      "tokens (packed into rows of --max-length), so a micro-batch fills the GPU whatever the sample lengths")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--optimizer", choices=["adamw", "muon"], help="muon: Muon for the linear layers' weight matrices, AdamW "
      "for the rest (muon.py); adamw: AdamW for everything")
    a("--lr-vision", type=float, help="0 freezes the vision tower")
    a("--lr-projector", type=float, help="0 freezes the projector")
    a("--lr-lm", type=float, help="0 freezes the language model")
    a("--weight-decay", type=float)
    a("--warmup-steps", type=int)
    a("--min-lr-ratio", type=float, help="after warmup, a cosine takes each learning rate down to lr x this")
    a("--grad-clip", type=float, default=1.0)
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the processes "
      "(FSDP2, fsdp.py) instead of replicating the model (DDP): for models whose replicas do not fit; AdamW only")
    a("--compile", action="store_true", help="torch.compile each LM and ViT block (fused kernels; the first "
      "steps are slow while it compiles)")
    a("--grad-checkpointing", action="store_true", help="recompute each LM and ViT block's activations in the "
      "backward pass instead of keeping them: less memory, ~1/3 more compute")

    a = p.add_argument_group("LoRA (lora.py)").add_argument
    a("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: off, train the weights themselves)")
    a("--lora-alpha", type=float, help="LoRA scaling numerator: update = alpha / rank * B A (default 2 * rank)")
    a("--lora-targets", nargs="+", default=["lm"],
      help="module-name patterns to adapt: lm (all LM linear layers), lm.attn, lm.mlp, vision, projector")

    a = p.add_argument_group("numeric head (numeric.py)").add_argument
    a("--numeric", action="store_true", help="<num><v> numbers are regressed values, not digit strings; a "
      "checkpoint with a head keeps it")
    a("--numeric-loss-weight", type=float, default=1.0, help="alpha in loss = token_ce + alpha * numeric_mse")
    a("--numeric-lr", type=float, default=1e-4, help="learning rate of the value embedding and regression head")
    a("--numeric-hidden", type=int, help="width of the value-embedding MLP (1 -> N -> hidden; default 512)")
    a("--numeric-transform", choices=["symlog", "identity"], help="space values are regressed in (default symlog)")

    a = p.add_argument_group("runtime").add_argument
    a("--log-every", type=int, default=10, help="log metrics (and check the loss is finite) every N steps")
    a("--eval-every", type=int)
    a("--eval-samples", type=int, default=256, help="validation samples for the loss")
    a("--save-every", type=int)
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on GPU)")
    a("--num-workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, 4 on GPU)")
    a("--seed", type=int, default=0)
    a("--wandb", metavar="PROJECT", help="also log metrics to this Weights & Biases project (pip install wandb; "
      "WANDB_MODE=offline to log without a network)")
    a("--stop-at-step", type=int, help=argparse.SUPPRESS)   # tests: stop with a checkpoint, as if interrupted
    return p


def resolve_args(args):
    """Fill every flag left unset from the preset (common values, then the stage's), then check the values."""
    preset = PRESETS[args.preset]
    if args.patch_size is not None and "patch_size" not in preset["common"]:
        raise SystemExit(f"--patch-size is for the tiny preset; --preset {args.preset} uses its vision tower's own")
    if "model" in preset["common"] and args.image_size is not None:
        raise SystemExit(f"--image-size is for the SigLIP VLM; --preset {args.preset} takes each image at its own "
                         "size, within --min-pixels/--max-pixels")
    # the flags typed on the command line, among those that default to None or False (_check_init_from's do)
    given = {key for key, value in vars(args).items() if value not in (None, False)}
    for key, value in {**NUMERIC_DEFAULTS, **preset["common"], **preset[args.stage]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if "batch_size" in given and "batch_tokens" not in given:
        args.batch_tokens = None   # an explicit --batch-size wins over the preset's token budget
    if args.data_dir:  # the synthetic dataset's files live wherever --data-dir puts them
        data = [args.data] if isinstance(args.data, str) else args.data or []
        args.data = [d.format(data_dir=args.data_dir) for d in data] or None
        args.val_data = args.val_data and args.val_data.format(data_dir=args.data_dir)
    if args.system == "none":
        args.system = None
    if args.data is None:
        raise SystemExit(f"--data is required with --preset {args.preset} (e.g. --data llava.json --image-root images/)")
    _check_args(args)
    if args.init_from:
        _check_init_from(args, given)
    if getattr(args, "fsdp", False):
        _check_fsdp(args)
    if getattr(args, "batch_tokens", None) is not None and args.batch_tokens < args.max_length:
        raise SystemExit(f"--batch-tokens {args.batch_tokens} < --max-length {args.max_length}: a longest sample "
                         "would not fit a micro-batch")
    return args


# ---- model, data, optimizer, checkpoints ----------------------------------------------------------------------


def build_model(args, dist):
    """(model, tokenizer) for the run: from --init-from (either family, by its config), a tiny preset from
    scratch, Qwen2.5-VL from the hub (--model), or pretrained SigLIP + Qwen2.5 backbones. A Qwen2.5-VL model takes
    --min-pixels/--max-pixels. With --numeric a model without a head gets a fresh one (numeric.py)."""
    if args.init_from:
        ckpt = tu.checkpoint_dir(args.init_from)
        model, tok = load_vlm(ckpt), Tokenizer.from_dir(ckpt)
    elif args.preset in ("tiny", "tiny-qwen-vl"):
        if dist.is_main:   # the dataset and its tokenizer, made once (rank 0) and read by every rank
            ensure_synthetic(args.data_dir, n_train=args.n_synthetic, n_val=max(50, args.n_synthetic // 20),
                             image_size=args.image_size)
        tu.barrier()
        tok = synthetic_tokenizer(args.data_dir)
        torch.manual_seed(args.seed)
        model = tiny_model(args, tok)
    elif args.model:
        fetch_once_per_machine([args.model], dist)
        path = resolve_checkpoint(args.model)
        model, tok = Qwen25VL.from_pretrained(path).train(), Tokenizer.from_dir(path)
        if model.cfg.image_token_id != tok.image_pad:
            raise ValueError(f"{path}: config.json's image_token_id {model.cfg.image_token_id} is not the "
                             f"tokenizer's <|image_pad|> ({tok.image_pad})")
        # the stop and pad ids by name from the tokenizer (the hub's config.json names only one eos id)
        model.cfg.stop_token_ids, model.cfg.pad_token_id = (tok.im_end, tok.endoftext), tok.endoftext
    else:
        fetch_once_per_machine([args.lm, args.vision], dist)
        tok = Tokenizer.from_dir(resolve_checkpoint(args.lm))
        model = VLM.from_backbones(args.lm, args.vision, ProjectorConfig(shuffle_factor=2, slot_embedding=args.slot_embedding),
                                   image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext),
                                   pad_token_id=tok.endoftext, image_size=args.image_size).float()
    if tok.num >= model.cfg.lm.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the LM only {model.cfg.lm.vocab_size} embeddings")
    pixels = {k: getattr(args, k, None) for k in ("min_pixels", "max_pixels")}
    if isinstance(model, Qwen25VL):   # the range the run trains (and its checkpoint samples) at
        model.cfg.min_pixels = pixels["min_pixels"] or model.cfg.min_pixels
        model.cfg.max_pixels = pixels["max_pixels"] or model.cfg.max_pixels
        model.image_processor()   # a range that cannot work (min > max) is refused here
    elif any(pixels.values()):
        raise SystemExit("--min-pixels/--max-pixels are for Qwen2.5-VL models; the SigLIP VLM's images are "
                         f"{model.cfg.image_size}x{model.cfg.image_size}")
    if getattr(args, "numeric", False) and not isinstance(model, WithNumericHead):
        numeric = NumericQwen25VL if isinstance(model, Qwen25VL) else NumericVLM
        model = numeric.from_vlm(model, NumericConfig(tok.num, hidden=args.numeric_hidden,
                                                      transform=args.numeric_transform))
    if isinstance(model, WithNumericHead):
        model.cfg.numeric.loss_weight = args.numeric_loss_weight
    return model, tok


def tiny_model(args, tok):
    """A tiny model of the preset's family, randomly initialised, for the synthetic data and its tokenizer."""
    lm = Qwen2Config(vocab_size=len(tok), **TINY_LM)
    special = dict(image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.endoftext)
    if args.preset == "tiny-qwen-vl":
        return Qwen25VL(Qwen25VLConfig(lm=lm, vision=VisionConfig(**TINY_QWEN_VISION), mrope_section=TINY_MROPE,
                                       vision_start_token_id=tok.vision_start, vision_end_token_id=tok.vision_end,
                                       **special))
    vision = dict(TINY_VISION, image_size=args.image_size, patch_size=args.patch_size)
    return VLM(VLMConfig(lm=lm, vision=SiglipConfig(**vision), **special,
                         projector=ProjectorConfig(shuffle_factor=2, slot_embedding=args.slot_embedding)))


def fetch_once_per_machine(checkpoints, dist):
    """Hub downloads happen once per machine: its first process (local rank 0) fetches every hub id into the hub
    cache while the machine's other processes wait, then all read the cached files. (8 processes downloading the
    same files at once would be 8 downloads racing into one cache.) Local directories are left as they are."""
    if dist.local_rank == 0:
        for c in checkpoints:
            resolve_checkpoint(c)
    tu.barrier()


def datasets(args, model, tok, verbose=True):
    """(training set, validation set or None), tokenized with the model's image size and chat template, every
    sample checked up front (data.py); verbose: print one summary line per data file (the main process)."""
    numeric = isinstance(model, WithNumericHead)
    kw = dict(tokenizer=tok, images=model.image_processor(), max_length=args.max_length, drop_long=args.drop_long,
              system=model.cfg.system_prompt, numeric=numeric, verbose=verbose)
    train_set = VLMDataset(load_data(args.data, args.image_root, seed=args.seed), **kw)
    val_set = VLMDataset(load_data(args.val_data, args.image_root), **kw) if args.val_data else None
    return train_set, val_set


def setup_trainable(model, args):
    """Decide what trains, before any wrapping (DDP registers hooks, FSDP shards, only what trains): with LoRA
    (--lora-rank) add the adapters, which then train at their part's rate while the rest of an adapted part is
    frozen (lora.py); freeze every part whose learning rate is 0."""
    if args.lora_rank:
        for part in {t.split(".")[0] for t in args.lora_targets}:
            if getattr(args, f"lr_{part}", None) == 0:
                raise SystemExit(f"--lora-targets adapts {part!r} but --lr-{part} is 0: give it a learning rate")
        lora.apply_lora(model, args.lora_targets, args.lora_rank, args.lora_alpha, seed=args.seed)
    for part in ("vision", "projector", "lm"):
        if getattr(args, f"lr_{part}") == 0:
            getattr(model, part).requires_grad_(False)
    return model


def make_vlm_optimizer(model, args):
    """AdamW, or Muon + AdamW (--optimizer muon), with one learning rate per part (0 freezes the part). Call
    setup_trainable first, and under FSDP after sharding (the optimizer must hold the sharded parameters)."""
    # Muon (muon.py) for the weight matrices of every linear layer; the embeddings, the output head, the patch
    # convolution, norms and biases (and the numeric head) stay on AdamW, as in modded-nanogpt and nanochat.
    matrices = [m.weight for part in (model.vision, model.projector, model.lm) for name, m in part.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head"] if args.optimizer == "muon" else []
    groups = [("vision", model.vision.parameters(), args.lr_vision),
              ("projector", model.projector.parameters(), args.lr_projector),
              ("lm", model.lm.parameters(), args.lr_lm)]
    if isinstance(model, WithNumericHead):
        groups.append(("numeric", model.numeric.parameters(), args.numeric_lr))
    return tu.make_optimizer(groups, weight_decay=args.weight_decay, muon_params=matrices)


def save_vlm_checkpoint(out_dir, model, tok, opt, step, args, dist):
    """Atomic checkpoint (call on every process: the RNG states are gathered, FSDP's shards written by each).
    With LoRA, model.safetensors holds the merged weights (a plain VLM checkpoint) and train_state.pt the
    adapters, for an exact --resume. args.json records the flags that started the run (and its world size and
    device type); a resumed run keeps it (check_resume compares against it)."""
    model = tu.unwrap(model)
    rngs = tu.gather_rng_states()
    files = {"tokenizer.json": tok.tok.to_str()}
    if not (args.resume and (Path(out_dir) / "args.json").exists()):
        files["args.json"] = json.dumps(run_record(args, dist), indent=2)
    if fsdp.is_sharded(model):
        extra = {"metrics_rows": tu.metrics_rows(out_dir) if dist.is_main else None}
        fsdp.save(out_dir, model, opt, model.cfg.to_dict(), step, files, rng_states=rngs, extra=extra,
                  names=file_names(model))
        return
    if dist.is_main:
        extra = lora.save_extra(model)   # the adapters, taken before merged() swaps them out
        extra["metrics_rows"] = tu.metrics_rows(out_dir)   # what a resume keeps of metrics.jsonl (check_resume)
        with lora.merged(model):
            names = file_names(model)
            state = None if names is None else {names[k]: v.detach().cpu() for k, v in model.state_dict().items()}
            tu.save_checkpoint(out_dir, model, model.cfg.to_dict(), optimizer=opt, step=step, rng_states=rngs,
                               extra=extra, files=files, state_dict=state)
    tu.barrier()


def file_names(model):
    """{parameter name: its name in model.safetensors}, or None where they are the same (the SigLIP VLM). A
    Qwen2.5-VL checkpoint is in the official hub layout, LoRA merged: transformers (and vLLM) read a training run's
    checkpoint as it is, and Qwen25VL.from_pretrained reads it back."""
    return model.hf_key_map() if isinstance(model, Qwen25VL) else None


def resume(out_dir, model, opt, dist):
    """Load --out-dir's checkpoint into the model and optimizer (and this process's RNG state); returns the train
    state ({"step", ...}). Three layouts: FSDP shards, LoRA (merged weights + adapters), plain."""
    if fsdp.is_sharded(model):
        return fsdp.load(out_dir, model, opt, dist.rank)
    if lora.has_lora(model):   # model.safetensors holds merged weights; the adapters are in train_state.pt
        return lora.load_checkpoint(out_dir, model, opt, dist.rank, dist.device, names=file_names(model))
    return tu.load_checkpoint(out_dir, model, opt, dist.rank, dist.device, names=file_names(model))


def run_record(args, dist):
    """What args.json holds: every flag, and the two facts of the run that change its numerics but are no flag."""
    return {**vars(args), "world_size": dist.world_size, "device_type": torch.device(dist.device).type}


def batches(dataset, args, dist, start_step, pad_id):
    """A DataLoader whose batch order is train_utils.batch_indices (or token_batch_indices with --batch-tokens):
    exact on resume, DDP == accumulation."""
    lengths = tuple(dataset.lengths)
    def order():
        for step in range(start_step, args.max_steps):
            for micro in range(args.grad_accum):
                if args.batch_tokens:
                    yield tu.token_batch_indices(step, micro, dist.rank, dist.world_size, args.grad_accum, lengths,
                                                 args.seed, args.batch_tokens)
                else:
                    yield tu.batch_indices(step, micro, dist.rank, dist.world_size, args.batch_size, args.grad_accum,
                                           len(dataset), args.seed, lengths if args.group_by_length else None)
    workers = args.num_workers if args.num_workers >= 0 else (4 if "cuda" in str(dist.device) else 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=list(order()), num_workers=workers,
                                       collate_fn=batch_maker(args, pad_id), pin_memory="cuda" in str(dist.device),
                                       worker_init_fn=_ignore_ctrl_c)


def batch_maker(args, pad_id):
    """samples -> model inputs: packed rows (--pack) or one padded row per sample. A partial: picklable (workers)."""
    if args.pack:
        return functools.partial(pack, pad_id=pad_id, max_length=args.max_length)
    return functools.partial(collate, pad_id=pad_id)


def to_device(batch, device):
    """The model inputs of a collated batch on `device`; the samples' names ("where") stay behind."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "where"}


@torch.no_grad()
def evaluate_loss(model, dataset, args, dist, pad_id, ctx):
    """Mean loss per labelled token over the first --eval-samples validation samples (split over processes)."""
    model.eval()
    make_batch = batch_maker(args, pad_id)
    total, count = 0.0, 0
    n = min(len(dataset), args.eval_samples)
    starts = list(range(dist.rank * args.batch_size, n, args.batch_size * dist.world_size))
    if fsdp.is_sharded(model):   # every process must run as many forward passes (each all-gathers weights)
        n_batches = -(-n // (args.batch_size * dist.world_size))
        starts += [None] * (n_batches - len(starts))
    for i in starts:
        first = 0 if i is None else i   # a process with no samples left repeats one batch and ignores it
        b = to_device(make_batch([dataset[j] for j in range(first, min(first + args.batch_size, n))]), dist.device)
        with ctx:
            out = tu.unwrap(model)(**b)
        if i is not None:
            total += float(out["loss"]) * int(out["n_tokens"])
            count += int(out["n_tokens"])
    stats = torch.tensor([total, count], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch.distributed.all_reduce(stats)
    model.train()
    return float(stats[0] / stats[1].clamp(min=1))


# ---- checks of the flags, of --resume and --init-from against the checkpoint (one line each, naming the flag) --


# Flags a --resume may change: they decide when to stop, log, evaluate and save, how batches are loaded, where
# metrics go and whether activations are recomputed, never what a step computes. Every other flag must match the run's args.json (check_resume). --max-steps also
# stretches the cosine schedule from the resume step on (said when it changes). --device may change only where
# it names the same kind of device (auto and cuda on a GPU machine): args.json's device_type is compared.
RESUME_MAY_CHANGE = ("max_steps", "log_every", "eval_every", "eval_samples", "eval_answers", "save_every",
                     "num_workers", "device", "wandb", "grad_checkpointing")
NOT_COMPARED = ("out_dir", "resume", "stop_at_step")   # where the run is (spelt any way), that it resumes, tests


def check_resume(args, dist):
    """--resume, before anything is built: finish a checkpoint swap a crash interrupted (train_utils.
    recover_checkpoint); refuse flags that differ from the run's args.json (all but RESUME_MAY_CHANGE), listing
    them; refuse a checkpoint past --max-steps, and say so when it is at it; forget the metrics.jsonl rows logged
    after the checkpoint (the steps that are run again). The flags that did change are printed and appended to
    resumes.jsonl; args.json keeps the flags that started the run."""
    out_dir = Path(args.out_dir)
    if dist.is_main:
        tu.recover_checkpoint(out_dir)
    tu.barrier()
    ckpt = tu.checkpoint_dir(out_dir)   # "no checkpoint at ..." when there is nothing to resume
    changed = _check_resume_flags(args, dist, ckpt)
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", mmap=True, weights_only=False)
    step = state["step"]
    if step > args.max_steps:
        raise ValueError(f"--resume: the checkpoint in {ckpt} is at step {step}, past --max-steps {args.max_steps}")
    if not dist.is_main:
        return
    if "metrics_rows" in state.get("extra", {}):   # the rows a lost run logged after the checkpoint go
        tu.trim_metrics(out_dir, state["extra"]["metrics_rows"])
    if step == args.max_steps:
        print(f"--resume: the checkpoint in {ckpt} is already at --max-steps {step}: nothing to train "
              "(raise --max-steps to train on)")
    if changed:
        print(f"--resume from step {step}: " + ", ".join(f"{_name(k)} {a} -> {b}" for k, (a, b) in changed.items())
              + (" (the learning-rate schedule now ends at the new --max-steps)" if "max_steps" in changed else ""))
        with open(out_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "changed": changed}) + "\n")


def _check_resume_flags(args, dist, ckpt):
    """{flag: (saved, now)} for the flags that changed since the run started, all in RESUME_MAY_CHANGE, or a
    ValueError listing those that may not change."""
    if not (ckpt / "args.json").exists():
        if dist.is_main:
            print(f"{ckpt}: no args.json, the flags of this --resume are not checked against the run's")
        return {}
    saved = json.loads((ckpt / "args.json").read_text())
    now = json.loads(json.dumps(run_record(args, dist)))   # as JSON reads it back: tuples are lists
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in NOT_COMPARED}
    refused = [f"{_name(k)} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ValueError(f"--resume: {', '.join(refused)} differ from the run in {ckpt} (args.json); only "
                         f"{', '.join(map(_name, RESUME_MAY_CHANGE))} may change on resume: use the run's flags, or "
                         "start a new run in another --out-dir (--init-from for its weights)")
    return changed


def _name(key):
    """A flag's name as typed (max_steps -> --max-steps); the two facts args.json adds in words."""
    return {"world_size": "the number of processes", "device_type": "the device type"}.get(
        key, "--" + key.replace("_", "-"))


def _check_args(args):
    """Flag values that cannot work, refused before anything is built (each used to fail deep inside, or not at
    all: --batch-size 0 as "max() arg is an empty sequence", --max-steps 0 as a run that silently did nothing)."""
    at_least_one = ("max_steps", "batch_size", "grad_accum", "max_length", "log_every", "eval_every", "save_every",
                    "eval_samples", "n_synthetic", "image_size", "patch_size", "numeric_hidden", "min_pixels",
                    "max_pixels")
    for key in at_least_one:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"{_name(key)} {value}: must be at least 1")
    not_negative = ("lr_vision", "lr_projector", "lr_lm", "numeric_lr", "weight_decay", "warmup_steps", "lora_rank",
                    "numeric_loss_weight", "eval_answers")
    for key in not_negative:
        value = getattr(args, key, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_name(key)} {value}: must be a finite number >= 0")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio {args.min_lr_ratio}: must be between 0 and 1")
    if not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        raise ValueError(f"--grad-clip {args.grad_clip}: must be > 0 (a huge value such as 1e9 clips nothing)")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha {args.lora_alpha}: must be > 0")
    if args.num_workers < -1:
        raise ValueError(f"--num-workers {args.num_workers}: must be >= 0 (or -1: 0 on CPU, 4 on GPU)")
    out_dir = Path(args.out_dir)
    blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"--out-dir {out_dir}: {blocked} is a file, not a directory")


def _check_init_from(args, given):
    """--init-from loads the model as it was trained: the flags that shape a new one (image size, patches,
    projector, numeric head) cannot change it. Given on the command line with another value than the checkpoint
    has, they are refused, saying which and what it has; --lm/--vision/--model (the backbones of a new model, which
    the checkpoint does not record) get a warning that they are ignored. A Qwen2.5-VL model takes its images at
    their own size: its --min-pixels/--max-pixels may change, the SigLIP VLM's image flags do not apply."""
    ckpt = tu.checkpoint_dir(args.init_from)
    cfg = tu.read_config(ckpt)
    if cfg.get("model_type") == "qwen2_5_vl":   # its images come at their own size: --min/--max-pixels may change
        siglip_only = sorted(given & {"image_size", "patch_size", "slot_embedding"})
        if siglip_only:
            raise ValueError(f"--init-from {ckpt} is a Qwen2.5-VL model: {', '.join(map(_name, siglip_only))} "
                             "shape the SigLIP VLM (its images: --min-pixels/--max-pixels)")
        decided, numeric = {}, cfg.get("nanovlm", {}).get("numeric")
    else:
        decided = {"image_size": cfg.get("image_size") or cfg["vision"]["image_size"],
                   "patch_size": cfg["vision"]["patch_size"], "slot_embedding": cfg["projector"].get("slot_embedding")}
        numeric = cfg.get("numeric")
    if numeric:   # a checkpoint without a head gets a new one (--numeric): these flags shape it
        decided.update(numeric_hidden=numeric["hidden"], numeric_transform=numeric["transform"])
    ignored = sorted(given & {"lm", "vision", "model"})   # the backbones a new model would be built from
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"warning: --init-from {ckpt} holds the model: {', '.join(map(_name, ignored))} ignored", file=sys.stderr)
    clash = [f"{_name(k)} {getattr(args, k)!r} (it has {v!r})" for k, v in decided.items()
             if k in given and getattr(args, k) != v]
    if clash:
        raise ValueError(f"--init-from {ckpt} decides the model, but {', '.join(clash)}: drop the flag(s), or "
                         "train a new model without --init-from")


def _ignore_ctrl_c(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves (StopOnCtrlC);
    a worker killed by it would fail the loader mid-step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_fsdp(args):
    if args.optimizer == "muon":
        raise SystemExit("--fsdp shards every weight matrix, and Muon needs whole matrices: use --optimizer adamw")
    if args.lora_rank:
        raise SystemExit("--fsdp with --lora-rank: LoRA trains few parameters and fits DDP; drop --fsdp")
    if args.dtype == "fp16":
        raise SystemExit("--fsdp computes in bf16 (or fp32): fp16 would need a sharded loss scaler; use --dtype bf16")
