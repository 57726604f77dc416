"""Train a small GPT from scratch that reads an image as codebook tokens and predicts its label as the next token.

    python train_gpt.py                                   # digits from scikit-learn, prepared on first use
    python train_gpt.py --max-steps 50 --n-layer 2        # a quick look
    torchrun --standalone --nproc_per_node=2 train_gpt.py # DDP (gloo on CPU, nccl on CUDA)
    python train_gpt.py --resume                          # continue out/gpt/last exactly
    python train_gpt.py --data out/pets --image-folder /path/to/classes   # folder-per-class images
    python sample_gpt.py --ckpt out/gpt/last --eval out/digits/test.jsonl  # then: evaluate, sample, export

Each sample is "<IMG> c_17 c_203 ... </IMG> <CLS> <CLS_k> <EOS>" (see nanovlm/codebook.py); the loss is
next-token cross-entropy on every position, the accuracy is read at <CLS> among <CLS_0>..<CLS_n>.
Writes OUT/metrics.jsonl, OUT/loss.png, OUT/accuracy.png, the checkpoint OUT/last (every --eval-every steps;
the test accuracy is that of the final weights) and OUT/hf, the final model for transformers
(GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained read it).
"""

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanovlm import codebook
from nanovlm import train_utils as tu
from nanovlm.cli import run_cli
from nanovlm.flops import flops_per_token, mfu
from nanovlm.gpt import GPT, GPTConfig


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("data (how --data is prepared when it has no train.jsonl yet)")
    g.add_argument("--data", default="out/digits", help="data directory (train/val/test.jsonl + vocab.json); "
                   "built from the scikit-learn digits (or --image-folder) if it has no train.jsonl")
    g.add_argument("--image-folder", default=None, help="folder-per-class images to prepare --data from")
    g.add_argument("--image-size", type=int, default=16, help="--image-folder images are resized to this square")
    g.add_argument("--codebook-size", type=int, default=512, help="k-means codes")
    g.add_argument("--patch", type=int, default=4, help="patch side in pixels")
    g.add_argument("--stride", type=int, default=2, help="patch stride in pixels")
    g.add_argument("--augment", type=int, default=16, help="copies of each training image, all but the first "
                   "turned by up to --rotate degrees and moved by up to --shift pixels (1: no augmentation)")
    g.add_argument("--rotate", type=float, default=12.0, help="largest rotation of an augmented copy, degrees")
    g.add_argument("--shift", type=float, default=1.0, help="largest move of an augmented copy in x and y, pixels")
    g.add_argument("--max-length", type=int, default=512, help="longest sequence; longer ones lose image codes")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    g.add_argument("--n-head", type=int, default=4, help="attention heads")
    g.add_argument("--n-embd", type=int, default=128, help="model width")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on embeddings and residual branches")
    g.add_argument("--attn-backend", default="auto", choices=["auto", "math", "sdpa", "flash"], help="attention")
    g.add_argument("--init-from", default=None, help="start from this GPT checkpoint's weights and shape "
                   "(fresh optimizer); its vocabulary must be the data's")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=3000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per optimizer step, over all processes")
    g.add_argument("--micro-batch", type=int, default=None, help="sequences per forward per process "
                   "(default: batch-size / processes); the rest is gradient accumulation")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g = p.add_argument_group("runtime")
    g.add_argument("--out-dir", default="out/gpt", help="checkpoints, metrics.jsonl and plots go here")
    g.add_argument("--eval-every", type=int, default=100, help="validate and checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | fp32")
    g.add_argument("--seed", type=int, default=1337, help="model init, data order and dropout (not the data)")
    g.add_argument("--resume", action="store_true", help="continue OUT/last exactly (weights, optimizer, RNG)")
    g.add_argument("--no-baseline", action="store_true", help="skip the scikit-learn pixel baselines at the end")
    return _check_args(p.parse_args(argv))


@torch.no_grad()
def evaluate(model, seqs, max_length, class_ids, device, ctx, batch=128):
    """Token loss / perplexity / next-token accuracy over all targets, and classification accuracy at <CLS>."""
    model.eval()
    loss_sum = n_tok = n_right_tok = n_right_cls = 0
    for i in range(0, len(seqs), batch):
        x, y = (t.to(device) for t in codebook.collate(seqs[i:i + batch], max_length))
        with ctx:
            logits, _ = model(x)                                                       # (B, T, V)
        logits = logits.float()
        mask = y != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum").item()
        n_tok += int(mask.sum())
        n_right_tok += int((logits.argmax(-1)[mask] == y[mask]).sum())
        pred, true = codebook.class_predictions(logits, x, y, class_ids)
        n_right_cls += int((pred == true).sum())
    model.train()
    loss = loss_sum / n_tok
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "token_acc": n_right_tok / n_tok,
            "acc": n_right_cls / len(seqs)}


def pixel_baselines(data_dir):
    """Classical baselines on the raw pixels of the very same splits (images.npz written by prepare)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC
    except ImportError:
        print("baseline skipped: pip install scikit-learn to compare with logistic regression / SVM on pixels")
        return {}
    d = np.load(Path(data_dir) / "images.npz")
    flat = lambda x: x.reshape(len(x), -1)
    out = {}
    for name, clf in (("logreg", LogisticRegression(max_iter=5000)), ("svm_rbf", SVC())):
        clf.fit(flat(d["x_train"]), d["y_train"])
        out[name] = float((clf.predict(flat(d["x_test"])) == d["y_test"]).mean())
    return out


def check_init_from(args, config, vocab, block_size):
    """--init-from takes the model's shape from the checkpoint; its vocabulary and length must fit the data."""
    if block_size > config.block_size:
        raise ValueError(f"--init-from {args.init_from}: the model reads {config.block_size} positions, the data "
                         f"has sequences of {block_size} tokens (pass --max-length {config.block_size} to cut them)")
    ckpt_vocab = codebook.load_vocab(tu.checkpoint_dir(args.init_from) / "vocab.json")
    if ckpt_vocab != vocab:
        raise ValueError(f"--init-from {args.init_from}: its vocab.json ({len(ckpt_vocab)} tokens) is not the one of "
                         f"--data {args.data} ({len(vocab)} tokens); prepare the data with the same codebook")
    ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("n_layer", "n_head", "n_embd")
               if getattr(args, k) != getattr(config, k)]
    if ignored:
        print(f"--init-from {args.init_from}: the model is {config.n_layer} layers, {config.n_head} heads, "
              f"{config.n_embd} wide as in the checkpoint; ignoring {', '.join(ignored)}")


def main(argv=None):
    args = get_args(argv)
    dist = tu.setup_distributed(args.device)
    device, out_dir, data_dir = dist.device, Path(args.out_dir), Path(args.data)
    ctx = tu.autocast_context(device, args.dtype)
    scaler = torch.amp.GradScaler(enabled=tu.resolve_dtype(device, args.dtype) == torch.float16)

    # ---- data (prepared once, by the main process)
    if not (data_dir / "train.jsonl").exists():
        if dist.is_main:
            print(f"preparing {data_dir} from {args.image_folder or 'scikit-learn digits'} ...")
            codebook.prepare(data_dir, args.image_folder or "digits", args.codebook_size, args.patch, args.stride,
                             args.image_size, seed=0, copies=args.augment, rotate=args.rotate, shift=args.shift)
        tu.barrier()
    meta_path = data_dir / "meta.json"
    if meta_path.exists():  # flags that shape the data must agree with the data already there
        meta = json.loads(meta_path.read_text())
        asked = {"codebook_size": args.codebook_size, "patch": args.patch, "stride": args.stride,
                 "copies": args.augment, "rotate": args.rotate, "shift": args.shift}
        differ = {k: (meta.get(k), v) for k, v in asked.items() if meta.get(k) != v}
        if differ:
            raise ValueError(f"{data_dir} was prepared with other settings (have, asked): {differ}; "
                             "pass a new --data directory to prepare it again")
    vocab = codebook.load_vocab(data_dir / "vocab.json")
    class_ids = codebook.class_token_ids(vocab)
    train = codebook.read_jsonl(data_dir / "train.jsonl", vocab)
    val = codebook.read_jsonl(data_dir / "val.jsonl", vocab)
    block_size = min(args.max_length, max(len(s) for s in train + val))

    micro = args.micro_batch or args.batch_size // dist.world_size
    accum = args.batch_size // (micro * dist.world_size)
    if accum < 1 or micro * accum * dist.world_size != args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {micro} x "
                         f"{dist.world_size} processes")

    # ---- model and optimizer
    torch.manual_seed(args.seed)
    if args.init_from:
        model = GPT.from_checkpoint(args.init_from, device, dropout=args.dropout)
        check_init_from(args, model.config, vocab, block_size)
    else:
        model = GPT(GPTConfig(vocab_size=len(vocab), block_size=block_size, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, dropout=args.dropout, attn_backend=args.attn_backend)).to(device)
    config = model.config
    optimizer = tu.make_optimizer([("gpt", model.parameters(), args.lr)], args.weight_decay)
    start_step = 0
    if args.resume:
        start_step = tu.load_checkpoint(out_dir / "last", model, optimizer, rank=dist.rank, device=device)["step"]
    else:
        torch.manual_seed(args.seed + dist.rank)  # dropout differs per rank; init was shared
    raw = model
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)

    ckpt_config = {"model_type": "gpt", "gpt": asdict(config), "max_length": args.max_length,
                   "data": str(data_dir), "args": vars(args)}
    files = {"vocab.json": data_dir / "vocab.json"}
    if (data_dir / "codebook.npz").exists():
        files["codebook.npz"] = data_dir / "codebook.npz"

    def save(step):
        rngs = tu.gather_rng_states()  # collective: all ranks call save()
        if dist.is_main:
            tu.save_checkpoint(out_dir / "last", raw, {**ckpt_config, "step": step}, optimizer=optimizer, step=step,
                               rng_states=rngs, files=files)

    logger = tu.MetricsLogger(out_dir, dist.is_main, resume_step=start_step if args.resume else None)
    n_params = raw.num_params()
    fpt = flops_per_token(n_params, config.n_layer, block_size, config.n_embd)
    if dist.is_main:
        print(f"{n_params:,} parameters | vocab {len(vocab)} | train {len(train)} val {len(val)} | "
              f"batch {args.batch_size} = {micro} x {accum} accum x {dist.world_size} procs | device {device}")

    # ---- train
    t_start = time.time()
    t_log, tokens_since = time.time(), 0
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not dist.is_main, desc="train")
    for step in bar:
        lr = tu.set_lr(optimizer, step, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        loss_acc = 0.0
        batches = [codebook.collate([train[i] for i in tu.batch_indices(step, m, dist.rank, dist.world_size, micro,
                                                                         accum, len(train), args.seed)],
                                    args.max_length) for m in range(accum)]
        # the loss is summed over the targets and divided by their count in the whole global batch (every
        # micro-batch, every process): splitting a batch changes nothing (lesson 9)
        norm = tu.global_counts([{"n_targets": int((y != -100).sum())} for _, y in batches], dist)
        for m, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            with tu.sync_context(model, m == accum - 1), ctx:
                _, loss = model(x, y, **norm)
            scaler.scale(loss).backward()
            loss_acc += loss.item()
            tokens_since += int((y != -100).sum()) * dist.world_size
        tu.check_finite(loss_acc, step)
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip if args.grad_clip > 0 else 1e9)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            tok_s = tokens_since / (time.time() - t_log)
            util = mfu(tok_s * fpt, device)
            logger.log(done, loss=loss_acc, lr=lr, grad_norm=float(gnorm), tok_per_s=tok_s,
                       **({"mfu": util} if util is not None else {}))
            bar.set_postfix(loss=f"{loss_acc:.3f}", lr=f"{lr:.1e}")
            t_log, tokens_since = time.time(), 0
        if done % args.eval_every == 0 or done == args.max_steps:
            v = evaluate(raw, val, args.max_length, class_ids, device, ctx)
            logger.log(done, **{f"val_{k}": val_ for k, val_ in v.items()})
            if dist.is_main:
                tqdm.write(f"step {done}: val loss {v['loss']:.4f} ppl {v['ppl']:.2f} "
                           f"token acc {v['token_acc']:.3f} class acc {v['acc']:.4f}")
            save(done)
            logger.plot(["loss", "val_loss"], "loss.png", "next-token loss")
            logger.plot(["val_acc", "val_token_acc"], "accuracy.png", "validation accuracy")
    train_time = time.time() - t_start

    # ---- test: the final weights (no choice made on the 270 validation images) vs. classical baselines
    if dist.is_main and (data_dir / "test.jsonl").exists():
        test = codebook.read_jsonl(data_dir / "test.jsonl", vocab)
        t = evaluate(raw, test, args.max_length, class_ids, device, ctx)
        val_acc = evaluate(raw, val, args.max_length, class_ids, device, ctx)["acc"]
        result = {"test_acc": t["acc"], "test_loss": t["loss"], "val_acc": val_acc, "train_time_s": train_time,
                  "steps": args.max_steps, "n_test": len(test), "threads": torch.get_num_threads()}
        if not args.no_baseline and (data_dir / "images.npz").exists():
            result.update({f"baseline_{k}_test_acc": a for k, a in pixel_baselines(data_dir).items()})
        logger.log(args.max_steps, **result)
        (out_dir / "results.json").write_text(json.dumps(result, indent=2))
        n = torch.get_num_threads()
        print(f"GPT (final weights) test accuracy: {t['acc']:.4f} on {len(test)} images, training {train_time:.0f}s "
              f"on {n} CPU thread{'s' * (n != 1)}")
        for k, a in result.items():
            if k.startswith("baseline_"):
                print(f"baseline {k[9:-9]} on raw pixels, same test split: {a:.4f}")
    if dist.is_main:  # the same model for transformers: GPT2LMHeadModel + tokenizer.json
        raw.save_hf(out_dir / "hf", **codebook.HF_TOKEN_IDS)
        codebook.save_tokenizer(vocab, out_dir / "hf")
    tu.cleanup_distributed()


def _check_args(args):
    for flag in ("max_steps", "batch_size", "augment", "eval_every", "log_every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    return args


if __name__ == "__main__":
    run_cli(main)
