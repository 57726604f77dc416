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

Qwen2.5-VL, after its SFT (train_sft.py --preset qwen2.5-vl-3b): weighted-CER OCR reward + the format reward
    python train_grpo.py --preset qwen2.5-vl-3b --init-from out/sft --data ocr_train.jsonl \
        --reward-funcs ocr format --lora-rank 8 --lora-alpha 32 --lora-targets lm projector --lr-lm 1e-5

Data: the SFT formats, the OCR jsonl {"query", "response", "image_path"} included; other columns (qtype, ...)
reach the reward functions as keyword arguments. Your rewards: --reward-plugin my_rewards.py (rewards.py).
The checkpoint in --out-dir is a plain checkpoint of the model's family (with LoRA: the merged weights). Every flag: --help
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
from nanovlm.tokenizer import IMAGE_TAG
from nanovlm.vlm_train import (build_model, build_parser, check_resume, make_vlm_optimizer, resolve_args, resume,
                               save_vlm_checkpoint, setup_trainable)


CHECKPOINT_SYSTEM = "(the checkpoint's)"   # --system left unset: prompts use the SFT checkpoint's system prompt


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
    a("--split-turns", action="store_true", help="every question of a multi-turn conversation becomes a prompt of its "
      "own (the images, that question, its answer), as held-out sets that ask one question per image do")
    a("--prompt-suffix", default="", help="text appended to each prompt's question, e.g. an instruction to answer in "
      "<think>...</think><answer>...</answer> (the format reward checks it; answers are then read from <answer>)")
    a("--dynamic-sampling", type=int, default=0, metavar="ROUNDS", help="DAPO's dynamic sampling: keep only the "
      "groups whose rewards differ (a flat group has no signal) and sample up to ROUNDS batches of prompts per "
      "micro-batch until --batch-size such groups are found (0: off, every group is trained)")
    a("--log-completions", type=int, default=1, metavar="N", help="print N sampled completions with their "
      "rewards every --log-every steps")
    p.set_defaults(system=CHECKPOINT_SYSTEM)   # unlike SFT, the default is the template the model was trained with
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
    if args.split_turns:
        samples = [t for s in samples for t in split_turns(s)]
    samples = [with_suffix(s, args.prompt_suffix) for s in samples]
    # chat_lengths counts without the generation prompt, which is always the same few tokens
    gen = len(tok.encode("<|im_start|>assistant\n"))
    lengths = [n + gen for n in tok.chat_lengths([s["messages"][:-1] for s in samples],
                                                image_token_counts(samples, images), cfg.system_prompt,
                                                wheres=[s["where"] for s in samples])]
    keep = fit_lengths(samples, [n + args.max_new_tokens for n in lengths], args.max_length, args.drop_long,
                       limit=f"--max-length {args.max_length} (prompt + --max-new-tokens {args.max_new_tokens})",
                       verbose=verbose)
    return [samples[i] for i in keep], [lengths[i] for i in keep]


def split_turns(sample):
    """A conversation -> one sample per question: its images, that question alone, its answer (`where` gains
    "turn k"). The images must all come with the first question; the other columns are the conversation's."""
    messages, system = sample["messages"], []
    if messages[0]["role"] == "system":
        system, messages = messages[:1], messages[1:]
    first = messages[0]["content"]
    tags = first.count(IMAGE_TAG)
    if tags != len(sample["images"]) or any(IMAGE_TAG in m["content"] for m in messages[1:]):
        raise ValueError(f"{sample['where']}: --split-turns needs every image in the first question")
    # A later question is asked the way the first one brings in the images: "<image>\nWhere is ...?"
    end = first.rindex(IMAGE_TAG) + len(IMAGE_TAG) if tags else 0
    prefix = first[:end + first.startswith("\n", end)]
    out = []
    for k in range(0, len(messages) - 1, 2):
        question = messages[k]["content"] if k == 0 else prefix + messages[k]["content"]
        turn = system + [{"role": "user", "content": question}, messages[k + 1]]
        out.append({**sample, "messages": turn, "where": f"{sample['where']} turn {k // 2 + 1}"})
    return out


def with_suffix(sample, suffix):
    """The sample with suffix appended to its last question (the one the model answers)."""
    if not suffix:
        return sample
    messages = [dict(m) for m in sample["messages"]]
    messages[-2]["content"] += suffix
    return {**sample, "messages": messages}


def all_mean(values, dist):
    """Mean of a list of floats over all processes (each may hold a different number)."""
    t = torch.tensor([float(np.sum(values)), float(len(values))], dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def all_sum(values, dist):
    """Sum of a list of numbers over all processes."""
    t = torch.tensor(float(np.sum(values)), dtype=torch.float64, device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(t)
    return float(t)


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
    """Prompts idx -> rollout batch with rewards and advantages (grpo.rollout + rewards.combine_rewards), and what
    keep_groups needs to rebuild it from some of its groups (each prompt's ids, images, question and solution)."""
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
    batch.update(prompts=prompts, prompt_images=images, solutions=solutions, questions=[s["messages"][-2]["content"] for s in chosen])
    return batch


def informative(rewards, G):
    """(num_groups,) bool: the groups whose rewards differ (the others have advantage 0: no signal)."""
    r = rewards.view(-1, G)
    return r.amax(1) > r.amin(1)


def keep_groups(batches, G, limit, pad_id):
    """Dynamic sampling (DAPO): the groups whose rewards differ, at most `limit` of them, from several rollout
    batches -> one batch (None if there is none). A flat group has advantage 0 everywhere: it costs a forward and
    a backward and teaches nothing. Advantages are computed within a group, so a kept group's stay what they were."""
    kept = [(b, g) for b in batches for g in informative(b["rewards"], G).nonzero().flatten().tolist()][:limit]
    if not kept:
        return None
    rows = [(b, r) for b, g in kept for r in range(g * G, (g + 1) * G)]
    prompts = [b["prompts"][g] for b, g in kept]
    images = [b["prompt_images"][g] for b, g in kept]
    batch = grpo.completion_batch([p for p in prompts for _ in range(G)], [b["completions"][r] for b, r in rows],
                                  pad_id)
    batch.update(images=grpo.repeat_prompts(prompts, images, G)[1], prompt_images=images,
                 stopped=torch.stack([b["stopped"][r] for b, r in rows]),
                 rewards=torch.stack([b["rewards"][r] for b, r in rows]),
                 advantages=torch.stack([b["advantages"][r] for b, r in rows]),
                 per_function={k: [b["per_function"][k][r] for b, r in rows] for k in batches[0]["per_function"]},
                 texts=[b["texts"][r] for b, r in rows], prompts=prompts,
                 solutions=[b["solutions"][g] for b, g in kept], questions=[b["questions"][g] for b, g in kept],
                 where=[b["where"][g] for b, g in kept])
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
        return grpo.shared_prompt_logps(ref_model, batch, args.temperature)
    with lora.adapters_disabled(model):
        return grpo.shared_prompt_logps(model, batch, args.temperature)


def rollout_step(model, ref_model, tok, samples, lengths, args, step, dist, ctx):
    """1. This process's prompts of the step (train_utils.batch_indices: exact on --resume), G completions each,
    scored, with the reference and (for several updates per batch) the sampling policy's log-probs.

    With --dynamic-sampling R, a micro-batch samples up to R batches of prompts (draws step * R + round of the
    prompt stream, so --resume stays exact) until --batch-size groups with differing rewards are found, and
    trains on those only. Returns (the micro-batches to train on, every batch sampled: for the metrics)."""
    model.eval()
    rounds = max(1, args.dynamic_sampling)
    rollouts, sampled = [], []
    for micro in range(args.grad_accum):
        batches = []
        for r in range(rounds):
            draw = step * rounds + r
            idx = tu.batch_indices(draw, micro, dist.rank, dist.world_size, args.batch_size, args.grad_accum,
                                   len(samples), args.seed, lengths)
            with ctx:
                batches.append(make_rollout(model, tok, samples, idx, args, sample_generator(args, draw, micro, dist)))
            found = sum(int(informative(b["rewards"], args.num_generations).sum()) for b in batches)
            if not args.dynamic_sampling or found >= args.batch_size:
                break
        sampled += batches
        b = (keep_groups(batches, args.num_generations, args.batch_size, model.cfg.pad_token_id)
             if args.dynamic_sampling else batches[0])
        if b is None:   # not one group with a signal: nothing to train on in this micro-batch
            continue
        with ctx:
            b["ref_logps"] = reference_logps(model, ref_model, b, args)
            with torch.no_grad():   # pi_old: needed only when the batch is reused for several updates
                b["old_logps"] = (grpo.shared_prompt_logps(model, b, args.temperature) if args.num_iterations > 1
                                  else None)
        rollouts.append(b)
    return rollouts, sampled


def update_step(model, opt, rollouts, args, step, dist, ctx):
    """2. --num-iterations optimizer updates on the rollout batch. Returns (per-micro-batch metrics, grad norm).

    Gradients are averaged over processes by hand (average_gradients: one all_reduce per update) rather than by
    wrapping the model in DDP, because the log-probs come from grpo.shared_prompt_logps, a forward of its own that
    DDP's wrapper would never see."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_tokens = torch.tensor(float(sum(int(b["completion_mask"].sum()) for b in rollouts)), device=dist.device)
    if dist.ddp:
        torch_dist.all_reduce(n_tokens)   # dapo divides by the tokens of the whole generation batch
    stats, grad_norm = {}, torch.zeros(())
    if n_tokens == 0:   # dynamic sampling found no group with a signal on any process: no update this step
        return stats, grad_norm
    for _ in range(args.num_iterations):
        for b in rollouts:
            mask = b["completion_mask"].to(dist.device)
            with ctx:
                logps, entropy = grpo.shared_prompt_logps(model, b, args.temperature, with_entropy=True)
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


def step_metrics(rollouts, sampled, stats, args, dist):
    """3. The step's metrics, averaged over processes: the rewards of every completion sampled (total and per
    function: the policy's score on fresh prompts), the update's metrics, the fraction of sampled groups whose
    completions all scored the same (no signal), of groups trained on (dynamic sampling) and of completions cut off."""
    G = args.num_generations
    row = {k: all_mean(v, dist) for k, v in stats.items()}
    row["reward"], row["reward_std"] = all_mean_std(torch.cat([b["rewards"] for b in sampled]).tolist(), dist)
    for name in args.reward_funcs:
        row[f"reward_{name}"], row[f"reward_{name}_std"] = all_mean_std(
            [x for b in sampled for x in b["per_function"][name]], dist)
    row["frac_zero_std_groups"] = all_mean([float(not x) for b in sampled for x in informative(b["rewards"], G)], dist)
    row["frac_truncated"] = all_mean([float(not s) for b in sampled for s in b["stopped"].tolist()], dist)
    if args.dynamic_sampling:
        n_kept = all_sum([len(b["prompts"]) for b in rollouts], dist)
        row["frac_groups_kept"] = n_kept / all_sum([len(b["prompts"]) for b in sampled], dist)
        row["groups_trained"] = n_kept / (args.grad_accum * dist.world_size)   # per micro-batch
    return row


def log_completions(batch, args, step):
    """--log-completions: the first N completions of the step's first trained batch, with their rewards."""
    G, n = args.num_generations, min(args.log_completions, len(batch["texts"]))
    lines = [f"step {step}: {n} sampled completions"]
    for i in range(n):
        scores = " ".join(f"{k} {v[i]:.2f}" for k, v in batch["per_function"].items())
        lines.append(f"  {batch['questions'][i // G]!r} -> {batch['texts'][i]!r} (solution "
                     f"{batch['solutions'][i // G]!r}): reward {float(batch['rewards'][i]):.2f} [{scores}], "
                     f"advantage {float(batch['advantages'][i]):+.2f}")
    tqdm.write("\n".join(lines))


def held_out(model, tok, val_samples, updates, args, log):
    """Greedy answers to the held-out prompts after `updates` optimizer steps (main process), logged, so the run's
    curve starts from the SFT model itself and uses the evaluation sample.py --eval uses."""
    if not val_samples:
        return None
    report = evaluate_answers(model, tok, val_samples, limit=args.eval_answers, max_new_tokens=args.max_new_tokens,
                              answer_tags=bool(args.prompt_suffix))
    r = report["all"]
    log.log(updates, val_exact=r["exact"], val_text=r["text"],
            **{f"val_exact_{k}": v["exact"] for k, v in report.items() if k != "all"})   # per question type
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
    if args.system != CHECKPOINT_SYSTEM:   # saved with the checkpoint: sampling and evaluation use the same template
        model.cfg.system_prompt = args.system
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
    val_samples = ([with_suffix(s, args.prompt_suffix) for s in load_data(args.val_data, args.image_root)]
                   if args.val_data and args.eval_answers and dist.is_main else None)

    report = before = held_out(model, tok, val_samples, 0, args, log) if start_step == 0 else None
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not dist.is_main, desc="grpo")
    stop = tu.StopOnCtrlC(dist, out_dir)   # Ctrl-C: finish the step, save, stop; twice: abort at once
    for step in bar:
        t0, c0 = time.time(), time.process_time()
        lr = tu.set_lr(opt, step, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        rollouts, sampled = rollout_step(model, ref_model, tok, samples, lengths, args, step, dist, ctx)
        stats, grad_norm = update_step(model, opt, rollouts, args, step, dist, ctx)
        row = step_metrics(rollouts, sampled, stats, args, dist)
        # step_cpu: CPU seconds of this process (all its threads), which a busy machine does not inflate as it does
        # step_time, the wall-clock seconds
        row.update(lr=lr, grad_norm=float(grad_norm), step_time=time.time() - t0, step_cpu=time.process_time() - c0)
        log.log(step, **row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", flat=f"{row['frac_zero_std_groups']:.2f}")
        if dist.is_main and step % args.log_every == 0:
            tqdm.write(f"step {step}: reward {row['reward']:.3f}, {row['frac_zero_std_groups']:.0%} of the groups flat"
                       + (f", entropy {row['entropy']:.3f}" if "entropy" in row else ""))
            if args.log_completions and rollouts:
                log_completions(rollouts[0], args, step)
        last = step == args.max_steps - 1 or step + 1 == args.stop_at_step
        stopping = stop.requested()
        if (step + 1) % args.eval_every == 0 or last:
            report = held_out(model, tok, val_samples, step + 1, args, log)
        if (step + 1) % args.save_every == 0 or last or stopping:
            save_vlm_checkpoint(out_dir, model, tok, opt, step + 1, args, dist)
            log.plot(["reward"] + [f"reward_{n}" for n in args.reward_funcs] + ["val_text", "val_exact"], "reward.png",
                     title="GRPO: training reward, held-out answers")
            log.plot(["frac_zero_std_groups", "frac_groups_kept", "entropy", "kl"], "groups.png",
                     title="GRPO: flat groups, groups kept, entropy (nats/token), KL")
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
