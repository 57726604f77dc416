"""Stage 3: GRPO. The SFT model answers each question G times; reward functions score the answers; the model
is pushed toward the answers that beat their siblings (nanovlm/grpo.py explains the loss, rewards.py the
rewards, lora.py the adapters).

Offline, on the embedded default (tiny model, synthetic OCR task, CPU), after train_sft.py:
    python train_grpo.py                        # --init-from out/sft --data data/synthetic/ocr_train.jsonl
    python train_grpo.py --lora-rank 8          # LoRA adapters on the LM; the reference model is free
    python sample.py --ckpt out/grpo --image data/synthetic/images/val/ocr_000000.png \\
        --prompt "What is the text in the image?"
How much there is to gain, before training: pass@8 against the greedy score (GRPO reinforces the better of
the sampled answers, so pass@k is a rough ceiling for the greedy score; lesson 11):
    python sample.py --ckpt out/sft --eval data/synthetic/ocr_val.jsonl --limit 500 --num-samples 8 --temperature 1

Real weights (GPUs), after stage 2:
    torchrun --standalone --nproc_per_node=8 train_grpo.py --preset qwen2.5-0.5b-siglip --init-from out/sft \\
        --data receipts.jsonl --reward-funcs ocr format --reward-weights 1 0.2 --beta 0.04 --out-dir out/grpo

One step: every process takes its --batch-size prompts (x --grad-accum micro-batches) in the order of
train_utils.batch_indices (exact on --resume), samples --num-generations completions of each, scores them,
then makes --num-iterations optimizer updates on that rollout batch (after the first, the clip of the PPO
ratio against the sampling policy's log-probs matters). The prompt is the conversation up to its last assistant answer, with
the checkpoint's own chat template (its system prompt); the last answer is the solution the rewards see.

Data: the SFT formats, the OCR jsonl {"query", "response", "image_path"} included; other columns (qtype, ...)
reach the reward functions as keyword arguments. Your rewards: --reward-plugin my_rewards.py (rewards.py).
The checkpoint in --out-dir is a plain VLM checkpoint (with LoRA: the merged weights). Every flag: --help
"""

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from nanovlm import grpo, lora, rewards
from nanovlm import train_utils as tu
from nanovlm.cli import run_cli
from nanovlm.data import fit_lengths, image_token_counts, load_data, load_images
from nanovlm.evaluate import evaluate_answers, format_report
from nanovlm.numeric import WithNumericHead
from nanovlm.vlm_train import (build_model, build_parser, check_resume, make_vlm_optimizer, resolve_args, resume,
                               save_vlm_checkpoint, setup_trainable)


def parse_args(argv=None):
    p = build_parser(__doc__, stage="grpo")
    a = p.add_argument
    a("--reward-funcs", nargs="+", help=f"reward functions to sum (built in: {', '.join(rewards.REWARD_FUNCS)})")
    a("--reward-weights", nargs="+", type=float, help="one weight per reward function (default: all 1)")
    a("--reward-plugin", nargs="*", default=[], help=".py files defining more reward functions (rewards.py)")
    a("--num-generations", type=int, help="completions sampled per prompt (the group size G)")
    a("--num-iterations", type=int, default=1, help="optimizer updates per rollout batch (PPO epochs)")
    a("--beta", type=float, default=0.0, help="weight of the KL penalty to the reference (SFT) model; 0: none")
    a("--eps-low", type=float, default=0.2, help="clip the ratio below at 1 - eps_low")
    a("--eps-high", type=float, default=0.2, help="clip the ratio above at 1 + eps_high (DAPO: 0.28)")
    a("--loss-type", default="grpo", choices=grpo.LOSS_TYPES, help="how token losses are averaged (grpo.py)")
    a("--scale-rewards", default="group", choices=["group", "batch", "none"], help="advantage = (r - mean) / std of")
    a("--temperature", type=float, default=1.0, help="sampling temperature (the log-probs use the same)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling")
    a("--max-new-tokens", type=int, help="longest completion; longer ones are cut off (and get no stop token)")
    a("--eval-answers", type=int, default=500, help="greedy-answer this many --val-data samples before training, "
      "every --eval-every steps and at the end (val_exact, val_text in metrics.jsonl; 0: never)")
    args = resolve_args(p.parse_args(argv))
    if not args.init_from:
        raise SystemExit(f"--init-from is required with --preset {args.preset}: the SFT checkpoint to improve")
    if args.batch_tokens:
        raise SystemExit("--batch-tokens is for SFT and pretraining: GRPO's --batch-size counts prompts")
    if args.fsdp:
        raise SystemExit("train_grpo.py replicates the model (DDP): for a model too big for that, train LoRA "
                         "adapters (--lora-rank), whose reference model comes free")
    if args.num_generations < 2:
        raise SystemExit("--num-generations must be >= 2: advantages compare completions of the same prompt")
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward_funcs):
        raise SystemExit(f"{len(args.reward_funcs)} --reward-funcs but {len(args.reward_weights)} --reward-weights")
    for path in args.reward_plugin:
        rewards.load_reward_plugin(path)
    unknown = [r for r in args.reward_funcs if r not in rewards.REWARD_FUNCS]
    if unknown:
        raise SystemExit(f"unknown reward function(s) {unknown}; known: {sorted(rewards.REWARD_FUNCS)}")
    _check_grpo_args(args)
    return args


def load_prompts(args, tok, cfg, images, verbose=True):
    """The training samples and their prompts' lengths in tokens, checked up front: a prompt with its longest
    completion must fit --max-length (never truncated: that would cut through image tokens or the question)."""
    samples = load_data(args.data, args.image_root, seed=args.seed)
    for s in samples:
        if len(s["messages"]) < 2 or s["messages"][-1]["role"] != "assistant":
            raise ValueError(f"{s['where']}: GRPO needs a conversation ending with an assistant answer (the solution)")
    # chat_lengths counts without the generation prompt, which is always the same few tokens
    gen = len(tok.encode("<|im_start|>assistant\n"))
    lengths = [n + gen for n in tok.chat_lengths([s["messages"][:-1] for s in samples],
                                                image_token_counts(samples, images), cfg.system_prompt,
                                                wheres=[s["where"] for s in samples])]
    keep = fit_lengths(samples, [n + args.max_new_tokens for n in lengths], args.max_length, args.drop_long,
                       limit=f"--max-length {args.max_length} (prompt + --max-new-tokens {args.max_new_tokens})",
                       verbose=verbose)
    return [samples[i] for i in keep], [lengths[i] for i in keep]


def all_mean(values, dist):
    """Mean of a list of floats over all processes (each may hold a different number)."""
    t = torch.tensor([float(np.sum(values)), float(len(values))], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def all_mean_std(values, dist):
    mean = all_mean(values, dist)
    return mean, all_mean([(v - mean) ** 2 for v in values], dist) ** 0.5


def average_gradients(params, dist):
    """DDP by hand: every process ends with the mean of all processes' gradients (one flat all_reduce)."""
    if not dist.ddp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= dist.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def sample_generator(args, step, micro, dist):
    """The RNG for one micro-batch's sampling: a pure function of the seed, the step and the slice of the global
    batch (numbered as in train_utils.batch_indices), so --resume draws the same completions an uninterrupted
    run would have, and 2 processes x 1 micro-batch sample what 1 process x 2 micro-batches sample."""
    seed = int(np.random.SeedSequence([args.seed, step, micro * dist.world_size + dist.rank]).generate_state(1)[0])
    return torch.Generator(device=dist.device).manual_seed(seed)


def make_rollout(model, tok, samples, idx, args, generator):
    """Prompts idx -> rollout batch with rewards and advantages (grpo.rollout + rewards.combine_rewards)."""
    cfg, processor = model.cfg, model.image_processor()
    device = model.lm.embed_tokens.weight.device
    chosen = [samples[i] for i in idx]
    prompts, solutions, images = [], [], []
    for s in chosen:
        ids, solution = grpo.prompt_ids(tok, s, [processor.image_tokens(p) for p in s["images"]], cfg.system_prompt)
        prompts.append(ids)
        solutions.append(solution)
        images.append({k: v.to(device) for k, v in load_images(s["images"], processor, s["where"]).items()})
    batch = grpo.rollout(model, prompts, images, args.num_generations, args.max_new_tokens, args.temperature,
                         args.top_p, generator)
    G = args.num_generations
    texts = [tok.decode(c[:-1] if stop else c, skip_special_tokens=True)
             for c, stop in zip(batch["completions"], batch["stopped"].tolist())]
    columns = {k: [s.get(k) for s in chosen for _ in range(G)] for k in {k for s in chosen for k in s} - {"messages"}}
    total, per_fn = rewards.combine_rewards(args.reward_funcs, args.reward_weights, texts,
                                            [x for x in solutions for _ in range(G)], **columns)
    batch["rewards"] = torch.tensor(total)
    batch["per_function"] = per_fn
    batch["advantages"] = grpo.group_advantages(batch["rewards"], G, scale=args.scale_rewards)
    batch["texts"] = texts
    batch["where"] = [s["where"] for s in chosen]   # the prompts' names, for errors
    return batch


def reference_model(model, args):
    """The model the KL penalty (beta > 0) keeps the policy near: the starting point. With LoRA, when only adapters
    train, it is this very network with the adapters off (None here); otherwise a frozen copy, taken before
    --resume loads the trained weights. None too when beta == 0: no KL term, no reference."""
    lora_only = lora.has_lora(model) and all(lora.is_adapter(n) for n, p in model.named_parameters() if p.requires_grad)
    if args.beta == 0 or lora_only:
        return None
    return lora.merge_lora(copy.deepcopy(model)).requires_grad_(False).eval()


@torch.no_grad()
def reference_logps(model, ref_model, batch, args):
    if args.beta == 0:
        return None
    if ref_model is not None:
        return grpo.completion_logps(ref_model, batch, args.temperature)
    with lora.adapters_disabled(model):
        return grpo.completion_logps(model, batch, args.temperature)


def rollout_step(model, ref_model, tok, samples, lengths, args, step, dist, ctx):
    """1. This process's prompts of the step (train_utils.batch_indices: exact on --resume), G completions each,
    scored, with the reference and (for several updates per batch) the sampling policy's log-probs."""
    model.eval()
    rollouts = []
    for micro in range(args.grad_accum):
        idx = tu.batch_indices(step, micro, dist.rank, dist.world_size, args.batch_size, args.grad_accum,
                               len(samples), args.seed, lengths)
        with ctx:
            b = make_rollout(model, tok, samples, idx, args, sample_generator(args, step, micro, dist))
            b["ref_logps"] = reference_logps(model, ref_model, b, args)
            with torch.no_grad():   # pi_old: needed only when the batch is reused for several updates
                b["old_logps"] = grpo.completion_logps(model, b, args.temperature) if args.num_iterations > 1 else None
        rollouts.append(b)
    return rollouts


def update_step(model, opt, rollouts, args, step, dist, ctx):
    """2. --num-iterations optimizer updates on the rollout batch. Returns (per-micro-batch metrics, grad norm).

    Gradients are averaged over processes by hand (average_gradients: one all_reduce per update) rather than by
    wrapping the model in DDP, because the log-probs come from grpo.completion_logps, a forward of its own that
    DDP's wrapper would never see."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_tokens = torch.tensor(float(sum(int(b["completion_mask"].sum()) for b in rollouts)), device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(n_tokens)   # dapo divides by the tokens of the whole generation batch
    stats = {}
    for _ in range(args.num_iterations):
        for b in rollouts:
            mask = b["completion_mask"].to(dist.device)
            with ctx:
                logps, entropy = grpo.completion_logps(model, b, args.temperature, with_entropy=True)
                loss, m = grpo.grpo_loss(logps, b["old_logps"], b["ref_logps"], b["advantages"].to(dist.device),
                                         mask, args.beta, args.eps_low, args.eps_high, args.loss_type,
                                         args.max_new_tokens, n_tokens)
            # dapo's loss is already a share of the global token count: sum it over micro-batches and
            # processes; the others are means: average them (the gradient all_reduce averages processes).
            (loss * (dist.world_size if args.loss_type == "dapo" else 1 / args.grad_accum)).backward()
            m.update(loss=loss.item(), entropy=float(grpo.masked_mean(entropy, mask)))
            for k, v in m.items():
                stats.setdefault(k, []).append(v)
        average_gradients(params, dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        tu.check_finite(sum(stats["loss"]), step, samples=[w for b in rollouts for w in b["where"]])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stats, grad_norm


def step_metrics(rollouts, stats, args, dist):
    """3. The step's metrics, averaged over processes: rewards (total and per function), the update's metrics,
    the fraction of groups whose completions all scored the same (no signal) and of completions cut off."""
    G = args.num_generations
    row = {k: all_mean(v, dist) for k, v in stats.items()}
    row["reward"], row["reward_std"] = all_mean_std(torch.cat([b["rewards"] for b in rollouts]).tolist(), dist)
    for name in args.reward_funcs:
        row[f"reward_{name}"], row[f"reward_{name}_std"] = all_mean_std(
            [x for b in rollouts for x in b["per_function"][name]], dist)
    row["frac_zero_std_groups"] = all_mean([grpo.frac_zero_std_groups(b["rewards"], G) for b in rollouts], dist)
    row["frac_truncated"] = all_mean([float(not s) for b in rollouts for s in b["stopped"].tolist()], dist)
    return row


def held_out(model, tok, val_samples, updates, args, log):
    """Greedy answers to the held-out prompts after `updates` optimizer steps (main process), logged, so the run's
    curve starts from the SFT model itself and uses the evaluation sample.py --eval uses."""
    if not val_samples:
        return None
    report = evaluate_answers(model, tok, val_samples, limit=args.eval_answers, max_new_tokens=args.max_new_tokens)
    r = report["all"]
    log.log(updates, val_exact=r["exact"], val_text=r["text"])
    tqdm.write(f"held-out after {updates} steps: exact {r['exact']:.1%}, text {r['text']:.1%}")
    return report


def main(argv=None):
    args = parse_args(argv)
    dist = tu.setup_distributed(args.device)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    if args.resume:   # before anything is built: the flags must be the run's (vlm_train.RESUME_MAY_CHANGE aside)
        check_resume(args, dist)
    model, tok = build_model(args, dist)   # --init-from: the SFT checkpoint, its tokenizer
    if isinstance(model, WithNumericHead):
        raise SystemExit(f"{args.init_from} has a numeric head; GRPO does not support it yet")
    model.to(dist.device)
    samples, lengths = load_prompts(args, tok, model.cfg, model.image_processor(), verbose=dist.is_main)
    lengths = tuple(lengths) if args.group_by_length else None   # prompts of similar length: less padding
    opt = make_vlm_optimizer(setup_trainable(model, args), args)   # LoRA adapters first when --lora-rank > 0
    if args.grad_checkpointing:
        tu.checkpoint_blocks([*model.vision.layers, *model.lm.layers])
    ref_model = reference_model(model, args)
    start_step = resume(out_dir, model, opt, dist)["step"] if args.resume else 0
    ctx = tu.autocast_context(dist.device, args.dtype)
    log = tu.MetricsLogger(out_dir, dist.is_main, resume_step=start_step if args.resume else None,
                           wandb_project=args.wandb, config=vars(args))
    if dist.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"grpo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M "
              f"trained{', LoRA' if lora.has_lora(model) else ''}), {len(samples)} prompts, "
              f"{args.batch_size * args.grad_accum * dist.world_size} prompts x {args.num_generations} completions "
              f"per step, {dist.world_size} process(es)")
    # only the main process evaluates, so only it reads the held-out file
    val_samples = (load_data(args.val_data, args.image_root)
                   if args.val_data and args.eval_answers and dist.is_main else None)

    report = before = held_out(model, tok, val_samples, 0, args, log) if start_step == 0 else None
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not dist.is_main, desc="grpo")
    stop = tu.StopOnCtrlC(dist, out_dir)   # Ctrl-C: finish the step, save, stop; twice: abort at once
    for step in bar:
        t0 = time.time()
        lr = tu.set_lr(opt, step, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        rollouts = rollout_step(model, ref_model, tok, samples, lengths, args, step, dist, ctx)
        stats, grad_norm = update_step(model, opt, rollouts, args, step, dist, ctx)
        row = step_metrics(rollouts, stats, args, dist)
        row.update(lr=lr, grad_norm=float(grad_norm), step_time=time.time() - t0)
        log.log(step, **row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['completion_length']:.1f}")
        if dist.is_main and step % 10 == 0:
            tqdm.write(f"step {step}: reward {row['reward']:.3f}  e.g. {rollouts[0]['texts'][0]!r}")
        last = step == args.max_steps - 1 or step + 1 == args.stop_at_step
        stopping = stop.requested()
        if (step + 1) % args.eval_every == 0 or last:
            report = held_out(model, tok, val_samples, step + 1, args, log)
        if (step + 1) % args.save_every == 0 or last or stopping:
            save_vlm_checkpoint(out_dir, model, tok, opt, step + 1, args, dist)
            log.plot(["reward"] + [f"reward_{n}" for n in args.reward_funcs] + ["val_text", "val_exact"], "reward.png",
                     title="GRPO: training reward, held-out answers")
        if stopping:
            raise tu.Interrupted(step + 1, out_dir)   # one line (run_cli), exit code 130
        if step + 1 == args.stop_at_step:
            break
    stop.restore()
    log.finish()
    if before is not None:
        print(f"\nheld-out answers before GRPO ({args.val_data}):\n{format_report(before)}")
    if report is not None:   # the evaluation after the last step
        print(f"\nheld-out answers after GRPO:\n{format_report(report)}")
        print(f"\ncheckpoint: {out_dir}   try: python sample.py --ckpt {out_dir} --image IMAGE --prompt TEXT")
    tu.cleanup_distributed()


def _check_grpo_args(args):
    """GRPO's own flag values that cannot work, one line each (build_parser's are checked by resolve_args)."""
    for key in ("max_new_tokens", "num_iterations"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    for key in ("beta", "eps_low", "eps_high"):
        if not (math.isfinite(getattr(args, key)) and getattr(args, key) >= 0):
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be a finite number >= 0")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature {args.temperature}: must be > 0 (GRPO samples; greedy answers are all alike)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
    bad = [w for w in args.reward_weights or [] if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--reward-weights {bad[0]}: must be a finite number")


if __name__ == "__main__":
    run_cli(main)
