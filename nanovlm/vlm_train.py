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
    qwen2.5-0.5b-siglip   Qwen/Qwen2.5-0.5B-Instruct + google/siglip-base-patch16-224 from the hub (or local
                          directories via --lm / --vision); --data is required.
Every preset value is a flag default and can be overridden. Why each tiny default is what it is (the runs that
chose it): docs/experiments.md.
"""

import argparse
import functools
import json

import torch

from nanovlm import lora
from nanovlm import train_utils as tu
from nanovlm.data import VLMDataset, collate, load_data, pack
from nanovlm.numeric import NumericConfig, NumericVLM
from nanovlm.projector import ProjectorConfig
from nanovlm.qwen2 import Qwen2Config
from nanovlm.siglip import SiglipConfig
from nanovlm.synthetic import ensure_synthetic, synthetic_tokenizer
from nanovlm.tokenizer import DEFAULT_SYSTEM, Tokenizer
from nanovlm.vlm import VLM, VLMConfig
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
    "qwen2.5-0.5b-siglip": {
        "common": dict(lm="Qwen/Qwen2.5-0.5B-Instruct", vision="google/siglip-base-patch16-224", image_size=224,
                       max_length=1024, pack=True, batch_size=8, grad_accum=4, warmup_steps=100, weight_decay=0.0,
                       eval_every=500, save_every=1000, system=DEFAULT_SYSTEM, optimizer="adamw",
                       min_lr_ratio=0.1),
        "pretrain": dict(max_steps=5000, lr_vision=0.0, lr_projector=1e-3, lr_lm=0.0, out_dir="out/pretrain"),
        "sft": dict(max_steps=5000, lr_vision=0.0, lr_projector=1e-4, lr_lm=2e-5, out_dir="out/sft"),
        "grpo": dict(max_steps=1000, batch_size=4, grad_accum=1, warmup_steps=20, save_every=100, lr_vision=0.0,
                     lr_projector=0.0, lr_lm=1e-6, max_new_tokens=256, num_generations=8,
                     reward_funcs=["ocr", "format"], out_dir="out/grpo"),
    },
}
# The tiny model: ~2M parameters; 96x96 images, 16x16 patches -> 6x6 patches -> pixel shuffle 2 -> 3x3 = 9 image
# tokens, one per cell of the synthetic scenes' 3x3 grid (so no cell is split across tokens).
TINY_LM = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)


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
    a("--lm", help="LM checkpoint dir or hub id (pretrained presets)")
    a("--vision", help="vision checkpoint dir or hub id (pretrained presets)")
    a("--image-size", type=int)
    a("--patch-size", type=int, help="tiny preset: the ViT's patch side in pixels (a pretrained tower has its own)")
    a("--slot-embedding", action="store_true", help="a new projector adds a learned vector per image token, "
      "telling the LM where in the image the token comes from (projector.py; off by default, docs/experiments.md)")

    a = p.add_argument_group("optimisation").add_argument
    a("--max-steps", type=int)
    a("--batch-size", type=int, help="samples per micro-batch per process")
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
    a("--numeric-hidden", type=int, default=512, help="width of the value-embedding MLP (1 -> N -> hidden)")
    a("--numeric-transform", default="symlog", choices=["symlog", "identity"], help="space values are regressed in")

    a = p.add_argument_group("runtime").add_argument
    a("--log-every", type=int, default=10, help="log metrics (and check the loss is finite) every N steps")
    a("--eval-every", type=int)
    a("--eval-samples", type=int, default=256, help="validation samples for the loss")
    a("--save-every", type=int)
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on GPU)")
    a("--num-workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, 4 on GPU)")
    a("--seed", type=int, default=0)
    a("--stop-at-step", type=int, help=argparse.SUPPRESS)   # tests: stop with a checkpoint, as if interrupted
    return p


def resolve_args(args):
    """Fill every flag left unset from the preset (common values, then the stage's)."""
    preset = PRESETS[args.preset]
    if args.patch_size is not None and "patch_size" not in preset["common"]:
        raise SystemExit(f"--patch-size is for the tiny preset; --preset {args.preset} uses its vision tower's own")
    for key, value in {**preset["common"], **preset[args.stage]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.data_dir:  # the synthetic dataset's files live wherever --data-dir puts them
        data = [args.data] if isinstance(args.data, str) else args.data or []
        args.data = [d.format(data_dir=args.data_dir) for d in data] or None
        args.val_data = args.val_data and args.val_data.format(data_dir=args.data_dir)
    if args.system == "none":
        args.system = None
    if args.data is None:
        raise SystemExit(f"--data is required with --preset {args.preset} (e.g. --data llava.json --image-root images/)")
    return args


# ---- model, data, optimizer, checkpoints ----------------------------------------------------------------------


def build_model(args, dist):
    """(model, tokenizer) for the run: from --init-from, pretrained backbones, or the tiny preset from scratch.
    With --numeric a model without a head gets a fresh one (numeric.NumericVLM)."""
    if args.init_from:
        ckpt = tu.checkpoint_dir(args.init_from)
        model, tok = VLM.from_pretrained(ckpt), Tokenizer.from_dir(ckpt)
    elif args.preset == "tiny":
        if dist.is_main:   # the dataset and its tokenizer, made once (rank 0) and read by every rank
            ensure_synthetic(args.data_dir, n_train=args.n_synthetic, n_val=max(50, args.n_synthetic // 20),
                             image_size=args.image_size)
        tu.barrier()
        tok = synthetic_tokenizer(args.data_dir)
        vision = dict(TINY_VISION, image_size=args.image_size, patch_size=args.patch_size)
        cfg = VLMConfig(lm=Qwen2Config(vocab_size=len(tok), **TINY_LM), vision=SiglipConfig(**vision),
                        projector=ProjectorConfig(shuffle_factor=2, slot_embedding=args.slot_embedding),
                        image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext),
                        pad_token_id=tok.endoftext)
        torch.manual_seed(args.seed)
        model = VLM(cfg)
    else:
        tok = Tokenizer.from_dir(resolve_checkpoint(args.lm))
        model = VLM.from_backbones(args.lm, args.vision, ProjectorConfig(shuffle_factor=2, slot_embedding=args.slot_embedding),
                                   image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext),
                                   pad_token_id=tok.endoftext, image_size=args.image_size).float()
        if tok.num >= model.cfg.lm.vocab_size:
            raise ValueError(f"tokenizer has {len(tok)} tokens but the LM only {model.cfg.lm.vocab_size} embeddings")
    if getattr(args, "numeric", False) and not isinstance(model, NumericVLM):
        model = NumericVLM.from_vlm(model, NumericConfig(tok.num, hidden=args.numeric_hidden,
                                                         transform=args.numeric_transform))
    if isinstance(model, NumericVLM):
        model.cfg.numeric.loss_weight = args.numeric_loss_weight
    return model, tok


def datasets(args, model, tok, verbose=True):
    """(training set, validation set or None), tokenized with the model's image size and chat template, every
    sample checked up front (data.py); verbose: print one summary line per data file (the main process)."""
    numeric = isinstance(model, NumericVLM)
    kw = dict(tokenizer=tok, image_size=model.cfg.image_size, image_tokens=model.cfg.image_tokens,
              max_length=args.max_length, drop_long=args.drop_long, system=model.cfg.system_prompt, numeric=numeric,
              verbose=verbose)
    train_set = VLMDataset(load_data(args.data, args.image_root, seed=args.seed), **kw)
    val_set = VLMDataset(load_data(args.val_data, args.image_root), **kw) if args.val_data else None
    return train_set, val_set


def make_vlm_optimizer(model, args):
    """AdamW, or Muon + AdamW (--optimizer muon), with one learning rate per part (0 freezes the part). With LoRA
    (--lora-rank) the adapters are added first and train at their part's rate; the rest of an adapted part is
    frozen (see lora.py)."""
    if args.lora_rank:
        for part in {t.split(".")[0] for t in args.lora_targets}:
            if getattr(args, f"lr_{part}", None) == 0:
                raise SystemExit(f"--lora-targets adapts {part!r} but --lr-{part} is 0: give it a learning rate")
        lora.apply_lora(model, args.lora_targets, args.lora_rank, args.lora_alpha, seed=args.seed)
    # Muon (muon.py) for the weight matrices of every linear layer; the embeddings, the output head, the patch
    # convolution, norms and biases (and the numeric head) stay on AdamW, as in modded-nanogpt and nanochat.
    matrices = [m.weight for part in (model.vision, model.projector, model.lm) for name, m in part.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head"] if args.optimizer == "muon" else []
    groups = [("vision", model.vision.parameters(), args.lr_vision),
              ("projector", model.projector.parameters(), args.lr_projector),
              ("lm", model.lm.parameters(), args.lr_lm)]
    if isinstance(model, NumericVLM):
        groups.append(("numeric", model.numeric.parameters(), args.numeric_lr))
    return tu.make_optimizer(groups, weight_decay=args.weight_decay, muon_params=matrices)


def train_flops(model, batch):
    """FLOPs of one forward and backward pass of `model` over a collated (CPU) batch, counting what runs, for MFU.

    Matrix products cost 2 FLOPs per multiply-add. Each weight's forward runs over the tokens it sees: the ViT
    over the patches of the batch's images, the projector over their image tokens, the LM over the real (not
    padding) tokens, the output head only over the labelled positions. Attention scores and weighted sums are
    counted per sample: L (L + 1) / 2 query-key pairs for a causal sample of L tokens, P^2 for an image of P
    patches. The backward pass costs 2x a layer's forward for the input gradient when anything before the layer
    trains (a gradient must pass through it), plus 2x for the weight gradient when its weight trains. Norms,
    activations, biases and embedding lookups are left out: a few percent at most."""
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

    n_images = batch["pixel_values"].shape[0]
    if n_images:
        patches = (cfg.image_size // cfg.vision.patch_size) ** 2
        conv = vit.embeddings.patch_embedding
        trains = conv.weight.requires_grad
        total += 2 * conv.weight.numel() * n_images * patches * (1 + trains)
        grad = trains
        for layer in vit.layers:
            a = layer.self_attn
            for m in (a.q_proj, a.k_proj, a.v_proj):
                linear(m, n_images * patches)
            attention(n_images * patches ** 2, cfg.vision.hidden_size)
            for m in (a.out_proj, layer.fc1, layer.fc2):
                linear(m, n_images * patches)
        linear(model.projector.fc1, n_images * cfg.image_tokens)
        linear(model.projector.fc2, n_images * cfg.image_tokens)
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


def save_vlm_checkpoint(out_dir, model, tok, opt, step, args, dist):
    """Atomic checkpoint (call on every rank: the RNG states are gathered). With LoRA, model.safetensors holds
    the merged weights (a plain VLM checkpoint) and train_state.pt the adapters, for an exact --resume."""
    model = tu.unwrap(model)
    rngs = tu.gather_rng_states()
    if dist.is_main:
        extra = lora.save_extra(model)   # the adapters, taken before merged() swaps them out
        with lora.merged(model):
            tu.save_checkpoint(out_dir, model, model.cfg.to_dict(), optimizer=opt, step=step, rng_states=rngs,
                               extra=extra,
                               files={"tokenizer.json": tok.tok.to_str(), "args.json": json.dumps(vars(args), indent=2)})
    tu.barrier()


def batches(dataset, args, dist, start_step, pad_id):
    """A DataLoader whose batch order is train_utils.batch_indices: exact on resume, DDP == accumulation."""
    lengths = tuple(dataset.lengths) if args.group_by_length else None
    def order():
        for step in range(start_step, args.max_steps):
            for micro in range(args.grad_accum):
                yield tu.batch_indices(step, micro, dist.rank, dist.world_size, args.batch_size, args.grad_accum,
                                       len(dataset), args.seed, lengths)
    workers = args.num_workers if args.num_workers >= 0 else (4 if "cuda" in str(dist.device) else 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=list(order()), num_workers=workers,
                                       collate_fn=batch_maker(args, pad_id), pin_memory="cuda" in str(dist.device))


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
    for i in range(dist.rank * args.batch_size, n, args.batch_size * dist.world_size):
        b = to_device(make_batch([dataset[j] for j in range(i, min(i + args.batch_size, n))]), dist.device)
        with ctx:
            out = tu.unwrap(model)(**b)
        total += float(out["loss"]) * int(out["n_tokens"])
        count += int(out["n_tokens"])
    stats = torch.tensor([total, count], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch.distributed.all_reduce(stats)
    model.train()
    return float(stats[0] / stats[1].clamp(min=1))
