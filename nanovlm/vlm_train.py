"""The VLM training loop shared by train_pretrain.py (stage 1) and train_sft.py (stage 2).

The two stages run the same loop (masked next-token cross-entropy on the assistant's answers) and differ in
their data and in which parts learn, so a stage is a column of defaults in PRESETS and the scripts stay short:

    stage 1, pretrain: image-caption pairs; with pretrained backbones only the projector learns, so the LM
                       learns to read the image features without forgetting how to write;
    stage 2, sft:      instruction data; the projector and the LM learn, the vision tower stays frozen.

Presets:
    tiny                  (default) everything from scratch on the synthetic dataset (generated on first use),
                          with a byte-level BPE trained on it: runs on a laptop CPU in minutes. Nothing is
                          pretrained, so every part learns in both stages; in SFT Muon trains the weight
                          matrices (muon.py: on this preset it learnt ~2x faster than AdamW, README).
    qwen2.5-0.5b-siglip   Qwen/Qwen2.5-0.5B-Instruct + google/siglip-base-patch16-224 from the hub (or local
                          directories via --lm / --vision); --data is required.
Every preset value is a flag default and can be overridden.
"""

import argparse
import functools
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanovlm import lora
from nanovlm import train_utils as tu
from nanovlm.data import VLMDataset, collate, load_data, pack
from nanovlm.numeric import NumericConfig
from nanovlm.projector import ProjectorConfig
from nanovlm.qwen2 import Qwen2Config
from nanovlm.siglip import SiglipConfig
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
        # embeddings drown, the ViT loses where things are, and answers stay at chance (README, status)
        # SFT reads the OCR strings too, a third of the samples: reading whole strings trains the ViT to see
        # detail, and the scene questions gain from it; 2:1 scene:OCR did better than 1:1 (README)
        # Muon for the weight matrices: the validation loss fell ~2x faster than with AdamW, so 2400 steps now
        # do better than AdamW's 3000; at lr 3e-4 it trained more smoothly than at 5e-4; a cosine down to 0
        # ended lower than one down to 0.1 lr. 2700 steps took 15 min 7 s when this VM ran slow (README)
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
# tokens, one per cell of the synthetic scenes' 3x3 grid. With 64x64 / 8x8 (16 tokens on a 4x4 grid, a cell spread
# over up to 4 of them) the same budget read no drawn word right (README, "The embedded default").
TINY_LM = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TINY_VOCAB = 1024


def build_parser(doc, stage):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=sorted(PRESETS), help="defaults for every flag left unset")
    a("--out-dir", help="checkpoint, metrics.jsonl and plots go here")
    a("--init-from", help="start from this VLM checkpoint directory (weights only)")
    a("--resume", action="store_true", help="continue the run in --out-dir exactly where its checkpoint stopped")
    a("--lm", help="LM checkpoint dir or hub id (pretrained presets)")
    a("--vision", help="vision checkpoint dir or hub id (pretrained presets)")
    a("--data", nargs="+", help="training data: PATH[:WEIGHT] ... (JSON/JSONL; LLaVA, role/content or OCR records)")
    a("--val-data", help="validation data file")
    a("--image-root", help="image paths in the data are relative to this (default: each data file's folder)")
    a("--data-dir", help="where the tiny preset writes its synthetic dataset")
    a("--n-synthetic", type=int, help="training images of the synthetic dataset (validation: 1/20 of it)")
    a("--max-steps", type=int)
    a("--batch-size", type=int, help="samples per micro-batch per process")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--max-length", type=int, help="longest sample in tokens; longer ones are an error (see --drop-long)")
    a("--drop-long", action="store_true", help="drop (and count) samples longer than --max-length")
    a("--pack", action=argparse.BooleanOptionalAction, help="pack several samples into each row of up to "
      "--max-length tokens (attention kept within each sample) instead of padding every row to the longest: "
      "same loss, less wasted compute when lengths differ")
    a("--group-by-length", action="store_true", help="batch samples of similar length together: less padding, "
      "faster steps, but batches of one kind (off: on the tiny default it sped steps 1.5x and learnt far slower)")
    a("--image-size", type=int)
    a("--patch-size", type=int, help="tiny preset: the ViT's patch side in pixels (a pretrained tower has its own)")
    a("--slot-embedding", action="store_true", help="a new projector adds a learned vector per image token, telling "
      "the LM where in the image the token comes from (projector.py; off: on the tiny default with AdamW it lifted "
      "position questions 30%% -> 54%% but cost colour and shape; a checkpoint keeps its own)")
    a("--optimizer", choices=["adamw", "muon"], help="muon: Muon for the linear layers' weight matrices, AdamW "
      "for the rest (muon.py); adamw: AdamW for everything")
    a("--lr-vision", type=float, help="0 freezes the vision tower")
    a("--lr-projector", type=float, help="0 freezes the projector")
    a("--lr-lm", type=float, help="0 freezes the language model")
    a("--freeze", nargs="*", default=[], choices=["vision", "projector", "lm"], help="freeze these parts")
    a("--weight-decay", type=float)
    a("--warmup-steps", type=int)
    a("--min-lr-ratio", type=float, help="after warmup, a cosine takes each learning rate down to lr x this")
    a("--grad-clip", type=float, default=1.0)
    a("--eval-every", type=int)
    a("--eval-samples", type=int, default=256, help="validation samples for the loss")
    a("--save-every", type=int)
    a("--system", help="system prompt (preset default); 'none' for no system turn")
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on GPU)")
    a("--num-workers", type=int, default=-1, help="DataLoader workers (-1: 0 on CPU, 4 on GPU)")
    a("--seed", type=int, default=0)
    a("--stop-at-step", type=int, help="stop after this step with a checkpoint, as if interrupted (tests --resume)")
    a("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: off, train the weights themselves)")
    a("--lora-alpha", type=float, help="LoRA scaling numerator: update = alpha / rank * B A (default 2 * rank)")
    a("--lora-targets", nargs="+", default=["lm"],
      help="module-name patterns to adapt: lm (all LM linear layers), lm.attn, lm.mlp, vision, projector")
    a("--numeric", action="store_true", help="numeric head: <num><v> numbers are regressed values (numeric.py), "
      "not digit strings; a checkpoint with one keeps it")
    a("--numeric-loss-weight", type=float, default=1.0, help="alpha in loss = token_ce + alpha * numeric_mse")
    a("--numeric-lr", type=float, default=1e-4, help="learning rate of the value embedding and regression head")
    a("--numeric-hidden", type=int, default=512, help="width of the value-embedding MLP (1 -> N -> hidden)")
    a("--numeric-transform", default="symlog", choices=["symlog", "identity"], help="space values are regressed in")
    p.set_defaults(stage=stage)
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
        args.data = [d.format(data_dir=args.data_dir) for d in ([args.data] if isinstance(args.data, str) else args.data or [])] or None
        args.val_data = args.val_data and args.val_data.format(data_dir=args.data_dir)
    if args.system == "none":
        args.system = None
    for part in args.freeze:
        setattr(args, f"lr_{part}", 0.0)
    if args.data is None:
        raise SystemExit(f"--data is required with --preset {args.preset} (e.g. --data llava.json --image-root images/)")
    return args


# ---- model and tokenizer --------------------------------------------------------------------------------------


def tiny_tokenizer(data_dir):
    """A byte-level BPE trained on the synthetic corpus once and kept beside it.

    Only the fixed language of the dataset (questions, captions, answer words) shapes the vocabulary, not the
    random strings the model must read (the words and OCR strings drawn in images): trained on those, BPE
    spends hundreds of merges on letter pairs ("QX", "KZ"), and reading a word becomes a guess among 500+
    pair tokens seen a few times each instead of 23 letters seen thousands of times."""
    from nanovlm.tokenizer import train_tiny_tokenizer
    path = Path(data_dir) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    texts = []
    for r in json.loads((Path(data_dir) / "captions_train.json").read_text()):
        texts += [re.sub(r'"[^"]*"', '""', t["value"].replace("<image>", "")) for t in r["conversations"]]
    for r in json.loads((Path(data_dir) / "sft_train.json").read_text()):
        texts += [t["value"].replace("<image>", "") for t in r["conversations"]
                  if t["from"] == "human" or r.get("qtype") != "text"]
    for line in (Path(data_dir) / "ocr_train.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["query"])
    tok = train_tiny_tokenizer(texts, TINY_VOCAB)
    tok.save(data_dir)
    return tok


def build_model(args, dist):
    """(model, tokenizer) for the run: from --init-from, pretrained backbones, or the tiny preset from scratch."""
    if args.init_from:
        ckpt = tu.checkpoint_dir(args.init_from)
        return VLM.from_pretrained(ckpt), Tokenizer.from_dir(ckpt)
    projector = ProjectorConfig(shuffle_factor=2, slot_embedding=args.slot_embedding)   # new in either case
    if args.preset == "tiny":
        if dist.is_main:
            from nanovlm.synthetic import ensure_synthetic
            ensure_synthetic(args.data_dir, n_train=args.n_synthetic, n_val=max(50, args.n_synthetic // 20),
                             image_size=args.image_size)
            tiny_tokenizer(args.data_dir)
        tu.barrier()
        tok = tiny_tokenizer(args.data_dir)
        vision = dict(TINY_VISION, image_size=args.image_size, patch_size=args.patch_size)
        cfg = VLMConfig(lm=Qwen2Config(vocab_size=len(tok), **TINY_LM), vision=SiglipConfig(**vision),
                        projector=projector, image_token_id=tok.image_pad,
                        stop_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.endoftext)
        torch.manual_seed(args.seed)
        return VLM(cfg), tok
    tok = Tokenizer.from_dir(resolve_checkpoint(args.lm))
    model = VLM.from_backbones(args.lm, args.vision, projector,
                               image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext),
                               pad_token_id=tok.endoftext, image_size=args.image_size)
    if tok.num >= model.cfg.lm.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the LM only {model.cfg.lm.vocab_size} embeddings")
    return model.float(), tok


def make_vlm_optimizer(model, args):
    """AdamW, or Muon + AdamW (--optimizer muon), with one learning rate per part (0 freezes the part). With LoRA
    (--lora-rank) the adapters are added first and train at their part's rate; the rest of an adapted part is
    frozen (see lora.py)."""
    if args.lora_rank:
        for part in {t.split(".")[0] for t in args.lora_targets}:
            if getattr(args, f"lr_{part}", None) == 0:
                raise SystemExit(f"--lora-targets adapts {part!r} but --lr-{part} is 0: give it a learning rate")
        lora.apply_lora(model, args.lora_targets, args.lora_rank, args.lora_alpha, seed=args.seed)
    numeric = model.numeric is not None
    # Muon (muon.py) for the weight matrices of every linear layer; the embeddings, the output head, the patch
    # convolution, norms and biases (and the numeric head) stay on AdamW, as in modded-nanogpt and nanochat.
    matrices = [m.weight for part in (model.vision, model.projector, model.lm) for name, m in part.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head"] if args.optimizer == "muon" else []
    return tu.make_optimizer([("vision", model.vision.parameters(), args.lr_vision),
                              ("projector", model.projector.parameters(), args.lr_projector),
                              ("lm", model.lm.parameters(), args.lr_lm)]
                             + ([("numeric", model.numeric.parameters(), args.numeric_lr)] if numeric else []),
                             weight_decay=args.weight_decay, muon_params=matrices)


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


# ---- the loop -------------------------------------------------------------------------------------------------


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
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, dataset, args, dist, pad_id, ctx):
    model.eval()
    make_batch = batch_maker(args, pad_id)
    total, count = 0.0, 0
    n = min(len(dataset), args.eval_samples)
    for i in range(dist.rank * args.batch_size, n, args.batch_size * dist.world_size):
        b = to_device(make_batch([dataset[j] for j in range(i, min(i + args.batch_size, n))]), dist.device)
        with ctx:
            out = tu.unwrap(model)(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], b["where"],
                                   b["num_values"])
        total += float(out["loss"]) * int(out["n_tokens"])
        count += int(out["n_tokens"])
    stats = torch.tensor([total, count], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch.distributed.all_reduce(stats)
    model.train()
    return float(stats[0] / stats[1].clamp(min=1))


def train(args):
    args = resolve_args(args)
    dist = tu.setup_distributed(args.device)
    torch.manual_seed(args.seed + dist.rank)
    out_dir = Path(args.out_dir)
    model, tok = build_model(args, dist)
    if args.numeric and model.numeric is None:   # a fresh head (a checkpoint with one keeps its own)
        model.enable_numeric(NumericConfig(tok.num, hidden=args.numeric_hidden, transform=args.numeric_transform))
    if model.numeric is not None:
        model.cfg.numeric.loss_weight = args.numeric_loss_weight
    model.to(dist.device)
    numeric = model.numeric is not None
    model.cfg.system_prompt = system = args.system   # saved with the checkpoint: sampling uses the same template
    image_size, image_tokens = model.cfg.image_size, model.cfg.image_tokens
    train_set = VLMDataset(load_data(args.data, args.image_root, seed=args.seed), tok, image_size, image_tokens,
                           args.max_length, args.drop_long, system=system, numeric=numeric, verbose=dist.is_main)
    val_set = (VLMDataset(load_data(args.val_data, args.image_root), tok, image_size, image_tokens, args.max_length,
                          args.drop_long, system=system, numeric=numeric, verbose=dist.is_main)
               if args.val_data else None)

    opt = make_vlm_optimizer(model, args)
    start_step = 0
    if args.resume:
        start_step = lora.load_checkpoint(out_dir, model, opt, dist.rank, dist.device)["step"]
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # FLOPs per token: every weight costs 2 in the forward pass; a trained weight 4 more in the backward pass
    # (input and weight gradients); a frozen LM or projector still passes gradients back (2) when anything
    # before it trains. (A per-token approximation: the vision tower's work per image is spread over tokens.)
    n_lm_proj = sum(p.numel() for part in (model.lm, model.projector) for p in part.parameters() if not p.requires_grad)
    n_frozen_vision = sum(p.numel() for p in model.vision.parameters() if not p.requires_grad)
    upstream_trains = any(p.requires_grad for part in (model.vision, model.projector) for p in part.parameters())
    flops_tok = (tu.flops_per_token(n_train, model.cfg.lm.num_hidden_layers, args.max_length, model.cfg.lm.hidden_size)
                 + (4 if upstream_trains else 2) * n_lm_proj + 2 * n_frozen_vision)
    if dist.ddp:  # samples without images leave the vision tower unused in that micro-batch
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.lr_vision > 0)
    ctx = tu.autocast_context(dist.device, args.dtype)
    log = tu.MetricsLogger(out_dir, dist.is_main, resume_step=start_step if args.resume else None)
    if dist.is_main:
        print(f"{args.stage}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
              f"{len(train_set)} samples, {image_tokens} tokens per image, {dist.world_size} process(es)")

    loader = iter(batches(train_set, args, dist, start_step, tok.endoftext))
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not dist.is_main, desc=args.stage)
    model.train()
    t0, tokens = time.time(), 0
    for step in bar:
        lr = tu.set_lr(opt, step, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        loss_sum, parts = 0.0, {"token_ce": 0.0, "numeric_mse": 0.0}
        for micro in range(args.grad_accum):
            b = to_device(next(loader), dist.device)
            with tu.sync_context(model, micro == args.grad_accum - 1), ctx:
                out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], b["where"],
                            b["num_values"])
                loss = out["loss"] / args.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            for k in parts if numeric else ():   # the two parts of the loss, logged separately
                parts[k] += float(out[k].detach()) / args.grad_accum
            tokens += int((b["attention_mask"] > 0).sum())
        tu.check_finite(loss_sum, step)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist.is_main and (step % 10 == 0 or step == args.max_steps - 1):
            dt = time.time() - t0
            tok_s = tokens * dist.world_size / max(dt, 1e-9)
            mfu = tu.mfu(tok_s / dist.world_size, flops_tok, dist.device)
            log.log(step, loss=loss_sum, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tok_s,
                    **({"mfu": mfu} if mfu is not None else {}), **(parts if numeric else {}))
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            t0, tokens = time.time(), 0
        last = step == args.max_steps - 1 or step + 1 == args.stop_at_step
        if val_set is not None and ((step + 1) % args.eval_every == 0 or last):
            val = evaluate_loss(model, val_set, args, dist, tok.endoftext, ctx)
            log.log(step, val_loss=val)
            if dist.is_main:
                tqdm.write(f"step {step + 1}: val loss {val:.4f}")
        if (step + 1) % args.save_every == 0 or last:
            save_vlm_checkpoint(out_dir, model, tok, opt, step + 1, args, dist)
            log.plot(["loss", "val_loss"], "loss.png", title=f"{args.stage} loss", logy=True)
        if step + 1 == args.stop_at_step:
            break
    tu.cleanup_distributed()
    return lora.merge_lora(tu.unwrap(model)), tok, args   # as saved: plain layers, any adapters folded in
