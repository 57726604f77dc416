"""Stage 2: instruction tuning. The projector and the LM learn to answer questions about images.
This file holds the training loop that stage 1 (train_pretrain.py) runs too, with its own defaults.

Offline, on the embedded default (tiny model from scratch, synthetic data generated on first use, CPU):
    python train_sft.py
    python sample.py --ckpt out/sft --image data/synthetic/images/val/000001.png --prompt "Where is the yellow triangle?"

Real weights (GPUs), after stage 1 (train_pretrain.py):
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset qwen2.5-0.5b-siglip --init-from out/pretrain \\
        --data llava_v1_5_mix665k.json --image-root images/ --out-dir out/sft

Qwen2.5-VL (the hub's Qwen/Qwen2.5-VL-3B-Instruct, or a local copy via --model), each image at its own size:
    python train_sft.py --preset qwen2.5-vl-3b --data ocr_train.jsonl --lr-vision 0 --lora-rank 8 \
        --lora-alpha 32 --lora-targets lm projector --lr-lm 1e-4 --lr-projector 1e-4 --grad-accum 16
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset qwen2.5-vl-7b --fsdp --grad-checkpointing \
        --data llava_v1_5_mix665k.json --image-root images/ --max-pixels 1003520 --out-dir out/sft-7b
    python train_sft.py --preset tiny-qwen-vl          # offline: a tiny Qwen2.5-VL from scratch on the synthetic data
Its checkpoint is in the hub layout (LoRA merged): transformers and Qwen25VL.from_pretrained read it as it is.

Ctrl-C saves a checkpoint at the end of the step. Resume exactly: add --resume (same flags, same --out-dir;
flags that would change the run are refused, vlm_train.RESUME_MAY_CHANGE lists those that may change).
Every flag: python train_sft.py --help
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanovlm import fsdp, lora
from nanovlm import train_utils as tu
from nanovlm import vlm_train as vt
from nanovlm.cli import run_cli
from nanovlm.data import load_data
from nanovlm.evaluate import evaluate_answers, format_report
from nanovlm.flops import mfu, train_flops


def train(args):
    """Run the loop; returns (model, tokenizer, args, dist). The process group stays up for the caller."""
    args = vt.resolve_args(args)
    dist = tu.setup_distributed(args.device)
    torch.manual_seed(args.seed + dist.rank)
    out_dir = Path(args.out_dir)
    if args.resume:   # before anything is built: the flags must be the run's (vt.RESUME_MAY_CHANGE aside)
        vt.check_resume(args, dist)

    # ---- model, data, optimizer --------------------------------------------------------------------------
    model, tok = vt.build_model(args, dist)
    model.to(dist.device)
    model.cfg.system_prompt = args.system   # saved with the checkpoint: sampling uses the same chat template
    train_set, val_set = vt.datasets(args, model, tok, verbose=dist.is_main)
    vt.setup_trainable(model, args)   # LoRA adapters, frozen parts: before DDP or FSDP see the parameters
    raw = model   # the plain module: what checkpoints store and what loss_counts() is asked
    blocks = [*raw.vision.layers, *raw.lm.layers]
    if args.grad_checkpointing:
        tu.checkpoint_blocks(blocks)
    if args.compile:   # block by block: shapes change with every packed batch, and blocks share one compiled graph
        for block in blocks:
            block.compile(dynamic=True)
    if args.fsdp:   # shards in place: raw is the sharded model too
        param_dtype = tu.resolve_dtype(dist.device, args.dtype)
        model = fsdp.shard(model, blocks, None if param_dtype == torch.float32 else param_dtype)
    elif dist.ddp:   # every trained parameter takes part in every step (a text-only batch: VLM.embed's blank image)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = vt.make_vlm_optimizer(raw, args)   # after sharding: FSDP's parameters are the shards

    # ---- resume: weights, optimizer, step and RNG from --out-dir ---------------------------------------------
    start_step = vt.resume(out_dir, raw, opt, dist)["step"] if args.resume else 0

    ctx = tu.autocast_context(dist.device, args.dtype)
    scaler = tu.grad_scaler(dist.device, args.dtype)   # fp16 only: bf16 and fp32 need no loss scaling
    log = tu.MetricsLogger(out_dir, dist.is_main, resume_step=start_step if args.resume else None,
                           wandb_project=args.wandb, config=vars(args))
    if dist.is_main:
        n_params = sum(p.numel() for p in raw.parameters())
        n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"{args.stage}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), {len(train_set)} "
              f"samples, {raw.image_processor()}, {dist.world_size} process(es)")

    # ---- the loop ------------------------------------------------------------------------------------------
    loader = iter(vt.batches(train_set, args, dist, start_step, tok.endoftext))
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not dist.is_main, desc=args.stage)
    model.train()
    t0, tokens, flops, losses, samples = time.time(), 0, 0, [], []
    stop = tu.StopOnCtrlC(dist, out_dir)   # Ctrl-C: finish the step, save, stop; twice: abort at once
    for step in bar:
        lr = tu.set_lr(opt, step, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        micro_batches = [next(loader) for _ in range(args.grad_accum)]
        # The loss is summed over labelled tokens and divided by their count in the whole global batch (every
        # micro-batch, every process; counted on the CPU, one all_reduce), so splitting a batch into
        # micro-batches or processes changes nothing. DDP then averages gradients over processes.
        norm = tu.global_counts([raw.loss_counts(b) for b in micro_batches], dist)
        loss, parts = 0.0, {}
        for micro, b in enumerate(micro_batches):
            tokens += int((b["attention_mask"] > 0).sum())   # counted on the CPU tensors: no device sync
            flops += train_flops(raw, b)
            with tu.sync_context(model, micro == args.grad_accum - 1), ctx:
                out = model(**vt.to_device(b, dist.device), **norm)
            scaler.scale(out["loss"]).backward()
            loss = loss + out["loss"].detach()
            for k in ("token_ce", "numeric_mse"):   # the numeric head's two parts of the loss, logged apart
                if k in out:
                    parts[k] = parts.get(k, 0.0) + out[k].detach()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: a DTensor
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)   # tensors: read (one sync) at the next log step, not here
        samples.append([w for b in micro_batches for w in b["where"]])   # named if that loss is not finite

        last = step == args.max_steps - 1 or step + 1 == args.stop_at_step
        stopping = stop.requested()
        if step % args.log_every == 0 or last or stopping:
            loss = tu.check_losses(losses, step, dist, samples)   # the losses since the last log, mean over processes
            dt = time.time() - t0
            tok_s = tokens * dist.world_size / max(dt, 1e-9)
            util = mfu(flops / max(dt, 1e-9), dist.device)   # this process's FLOP/s over its device's peak
            log.log(step, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tok_s,
                    **({"mfu": util} if util is not None else {}), **{k: float(v) for k, v in parts.items()})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", **({"mfu": f"{util:.1%}"} if util else {}))
            t0, tokens, flops, losses, samples = time.time(), 0, 0, [], []
        if val_set is not None and ((step + 1) % args.eval_every == 0 or last):
            val = vt.evaluate_loss(model, val_set, args, dist, tok.endoftext, ctx)
            log.log(step, val_loss=val)
            if dist.is_main:
                tqdm.write(f"step {step + 1}: val loss {val:.4f}")
        if (step + 1) % args.save_every == 0 or last or stopping:
            tu.check_losses(losses, step, dist, samples)   # never save weights a non-finite loss has touched
            vt.save_vlm_checkpoint(out_dir, model, tok, opt, step + 1, args, dist)
            log.plot(["loss", "val_loss"], "loss.png", title=f"{args.stage} loss", logy=True)
        if stopping:
            raise tu.Interrupted(step + 1, out_dir)   # one line (run_cli), exit code 130
        if step + 1 == args.stop_at_step:
            break
    stop.restore()
    log.finish()
    return lora.merge_lora(raw), tok, args, dist   # as saved: plain layers, any adapters folded in


def main(argv=None, stage="sft", doc=__doc__):
    parser = vt.build_parser(doc, stage=stage)
    parser.add_argument("--eval-answers", type=int, default=500 if stage == "sft" else 0,
                        help="after training, answer this many validation questions and print accuracy (0: skip)")
    args = parser.parse_args(argv)
    model, tok, args, dist = train(args)
    if args.eval_answers and args.val_data:   # every process answers its share; one prints
        report = evaluate_answers(model, tok, load_data(args.val_data, args.image_root), limit=args.eval_answers,
                                  show=5 if dist.is_main else 0, dist=dist)
        if dist.is_main:
            print(f"\nheld-out answers ({args.val_data}):\n{format_report(report)}")
            print(f"\ncheckpoint: {args.out_dir}   try: python sample.py --ckpt {args.out_dir} --image IMAGE "
                  "--prompt TEXT")
    tu.cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
