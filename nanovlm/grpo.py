"""
GRPO: Group Relative Policy Optimization, the reinforcement-learning stage (train_grpo.py).

For each prompt we sample a group of G completions from the current policy, score each with reward
functions (rewards.py), and ask: which completions did better than their siblings? That comparison is the
advantage, and it replaces PPO's learned value function:

    A_i = (r_i - mean(group)) / (std(group) + eps)

A completion above its group's mean gets A > 0 and its tokens are made more likely; below, less likely. A
group where every completion scored the same carries no signal (A = 0 for all of them).

The loss is PPO's clipped surrogate, per completion token t of completion i:

    ratio = pi(token) / pi_old(token) = exp(logp - old_logp)
    loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3

pi_old is the policy that sampled the completions. When each batch of samples is used for a single
optimizer step, pi == pi_old numerically and ratio == 1, but its gradient is still d logp: the loss is the
policy gradient -A * logp. When a batch is reused for several steps, the clip stops a token's update once
its probability has moved more than eps away from where it was sampled, in the direction the advantage
pushes (ratio > 1 + eps_high with A > 0, or < 1 - eps_low with A < 0): there the min picks the clipped,
constant term and the gradient is exactly 0.

KL_k3 = exp(ref - logp) - (ref - logp) - 1 keeps the policy near a frozen reference model (Schulman's k3
estimator of KL(pi || ref): always >= 0, and 0 with zero gradient when pi == ref). beta = 0 drops it, and
then no reference model is needed.

How per-token losses become one number matters with completions of unequal length (loss_type):
  grpo     mean over each completion's tokens, then over completions (DeepSeekMath). A long completion's
           tokens each weigh less than a short one's: a length bias.
  bnpo     mean over all tokens of the batch.
  dr_grpo  sum / (B * max_completion_length): a constant denominator, no length bias (Dr. GRPO).
  dapo     sum / number of completion tokens in the whole generation batch, across gradient-accumulation
           micro-batches and ranks (DAPO), so every token weighs the same however the batch is split.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from nanovlm.attention import KVCache, Packing
from nanovlm.data import cat_images

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LOGIT_CHUNK_BYTES = 2 ** 30   # token_logps: fp32 logits made (and kept for the backward pass) per chunk


# ----------------------------------------------------------------------------------------------------------
# Advantages

def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Group-relative advantages for rewards laid out as consecutive groups: [p0 c0, p0 c1, ..., p1 c0, ...].

    rewards: (N,) with N a multiple of group_size. advantage = r - group mean, divided by
      scale="group": the group's std (Bessel-corrected) + eps
      scale="batch": the std of all N rewards (Bessel-corrected) + eps
      scale="none":  nothing (Dr. GRPO: dividing by a small std over-weights nearly-solved prompts)
    A group whose rewards are all equal gets exactly 0 (in floating point its mean may miss the value by an
    ulp, and dividing that by a ~0 std would turn rounding noise into a large advantage).
    """
    rewards = torch.as_tensor(rewards)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    _check_advantage_args(rewards, group_size, scale)

    r = rewards.double().view(-1, group_size)  # (num_groups, G); float64 so the statistics do not drift
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (num_groups, 1)
    adv = adv.masked_fill(flat, 0.0)
    return adv.view(-1).to(dtype)  # (N,)


def frac_zero_std_groups(rewards, group_size):
    """Fraction of groups whose rewards are all equal: they give zero advantage, so no learning signal."""
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)  # (num_groups, G)
    return (r.amax(dim=1) == r.amin(dim=1)).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# Loss

def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is nonzero (all of them, or along dim); 0 where none are."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # padding may hold inf/nan
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="grpo", max_completion_length=None, num_items_in_batch=None):
    """The GRPO loss of one (micro-)batch of completions and its metrics (see the module docstring).

    logps:      (B, T) log-probs of the sampled completion tokens under the policy being trained (with grad)
    old_logps:  (B, T) the same under the policy that sampled them, or None when on-policy (ratio = 1)
    ref_logps:  (B, T) the same under the frozen reference model; needed only when beta > 0
    advantages: (B,)   one per completion, from group_advantages
    mask:       (B, T) 1 for completion tokens to train on (mask_after_eos), 0 for padding
    max_completion_length: the generation cap, for loss_type="dr_grpo"
    num_items_in_batch: for loss_type="dapo", the number of completion tokens in the whole generation batch
      (all micro-batches of the step, all ranks); defaults to mask.sum(), right for a single micro-batch.
    Returns (loss, metrics): metrics are python floats: "completion_length" (mean tokens per completion),
    "clip_ratio_low" / "clip_ratio_high" / "clip_ratio_region" (fraction of tokens whose gradient the clip
    removed on the low side (A < 0), the high side (A > 0), either), and "kl" (mean k3) when beta > 0.
    """
    _check_loss_args(logps, old_logps, ref_logps, advantages, mask, beta, eps_low, eps_high, loss_type,
                     max_completion_length)
    B, T = logps.shape
    mask = mask.bool()
    # Padding positions may hold anything (-inf log-probs of pad tokens); zero them before exp so neither the
    # loss nor its gradient can see a nan from there.
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    logps = torch.where(mask, logps, zero)
    old = logps.detach() if old_logps is None else torch.where(mask, old_logps.detach(), zero)

    ratio = torch.exp(logps - old)  # (B, T)
    A = advantages.detach().to(logps.dtype)[:, None]  # (B, 1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)  # (B, T)
    if beta > 0:
        delta = torch.where(mask, ref_logps.detach(), zero) - logps
        kl = torch.exp(delta) - delta - 1  # (B, T), >= 0
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, zero)

    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (B * max_completion_length)
    else:  # dapo
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = per_token.sum() / n.to(per_token.device).clamp(min=1)

    with torch.no_grad():
        # Where the clip removed the gradient: moved past the bound in the direction A pushes.
        low = (ratio < 1 - eps_low) & (A < 0) & mask
        high = (ratio > 1 + eps_high) & (A > 0) & mask
        metrics = {
            "completion_length": mask.sum(-1).float().mean().item(),
            "clip_ratio_low": masked_mean(low.float(), mask).item(),
            "clip_ratio_high": masked_mean(high.float(), mask).item(),
            "clip_ratio_region": masked_mean((low | high).float(), mask).item(),
        }
        if beta > 0:
            metrics["kl"] = masked_mean(kl, mask).item()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Helpers for rollouts and logging

def mask_after_eos(ids, eos_ids):
    """Completion mask (B, T) of 0/1 longs: 1 up to and including the first end-of-turn token, 0 after it.

    ids: (B, T) sampled completion ids; eos_ids: one id or several (e.g. <|im_end|> and <|endoftext|>).
    A row with no end token (cut off at the length cap) is all ones.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    eos = torch.as_tensor(eos_ids, device=ids.device).reshape(-1)  # (n_eos,)
    is_eos = torch.isin(ids, eos)  # (B, T)
    T = ids.shape[1]
    # index of the first eos per row, T when there is none
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return (torch.arange(T, device=ids.device)[None, :] <= first[:, None]).long()  # (B, T)


def entropy_from_logits(logits):
    """Entropy of the next-token distribution at every position: (B, T, V) -> (B, T), in nats.

    H = logsumexp(z) - sum softmax(z) * z, computed in float32 (bf16 logits lose the small probabilities).
    A policy whose entropy collapses toward 0 has stopped exploring. Wrap in torch.no_grad() for logging.
    """
    logits = logits.float()
    p = F.softmax(logits, dim=-1)  # (B, T, V)
    # a banned token (logit -inf) has p = 0 and adds nothing; without nan_to_num 0 * -inf would be nan
    return torch.logsumexp(logits, dim=-1) - (p * logits.nan_to_num(neginf=0.0)).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Rollouts: G completions per prompt, sampled together, and their per-token log-probs
#
# A rollout batch holds B = n_prompts * G rows, laid out as consecutive groups (p0 c0, p0 c1, ..., p1 c0, ...)
# as group_advantages expects. The whole batch is sampled in one VLM.generate call with the KV cache:
# generate(num_samples=G) runs each prompt and its images through the model once, then copies its cache G times.
#
# The completion a row is trained on ends with its end-of-turn token (generate(include_stop=True)): without it
# in the loss the model would never be taught to stop. A row cut off at max_new_tokens has none.

def prompt_ids(tokenizer, sample, image_tokens, system):
    """A sample's prompt: its conversation up to the last assistant answer (the solution), then the
    generation prompt "<|im_start|>assistant\n". Returns (ids, solution)."""
    messages = sample["messages"]
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"{sample['where']}: GRPO needs a conversation ending with an assistant answer "
                         "(the solution the rewards compare to)")
    ids, _ = tokenizer.encode_chat(messages[:-1], image_tokens, add_generation_prompt=True, system=system,
                                   where=sample["where"])
    return ids, messages[-1]["content"]


def repeat_prompts(prompts, images, n):
    """Each prompt n times in a row (p0, p0, ..., p1, p1, ...) with its images repeated to match, so one generate
    call samples n completions of every prompt. images: one dict of image inputs per prompt (data.load_images:
    the SigLIP VLM's pixel_values, or Qwen2.5-VL's patch rows and grid rows, which repeat together). Returns
    (rows, image inputs of the rows)."""
    rows = [p for p in prompts for _ in range(n)]
    return rows, cat_images([x for x in images for _ in range(n)])


@torch.no_grad()
def rollout(model, prompts, images, num_generations, max_new_tokens, temperature, top_p=1.0, generator=None,
            compile=False):
    """Sample num_generations completions of each prompt in one batched generate call (compile: a compiled
    decode step, see VLM.generate).

    prompts: list of token-id lists; images: one dict of image inputs per prompt (data.load_images), on the
    model's device. Returns a batch dict for completion_logps: input_ids / attention_mask (B, T) prompt +
    completion, right-padded; the image inputs with each prompt's images repeated G times (under "images");
    prompt_lengths (B,); completion_ids (B, C) and completion_mask (B, C) (1 up to and including the first stop
    token, 0 after: mask_after_eos semantics); completions: the token lists; stopped (B,) bool (False: cut off at
    max_new_tokens).
    """
    if temperature <= 0:
        raise ValueError(f"GRPO samples its completions: temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.cfg
    # include_stop: a row that stopped ends with the stop token it sampled, which is trained like any other
    # token; a row cut off at max_new_tokens has none.
    completions = model.generate(prompts, **cat_images(images), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, generator=generator, include_stop=True,
                                 num_samples=num_generations, compile=compile)
    rows, repeated = repeat_prompts(prompts, images, num_generations)
    stopped = [bool(c) and c[-1] in cfg.stop_token_ids for c in completions]
    batch = completion_batch(rows, completions, cfg.pad_token_id)
    batch.update(images=repeated, stopped=torch.tensor(stopped))
    return batch


def completion_batch(prompts, completions, pad_id):
    """Token lists -> padded tensors (see rollout), with their attention.Packing. The completion mask covers each
    completion's own tokens, stop included."""
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    completion_ids = torch.full((B, C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(B, C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[b, :len(p) + len(c)] = True
        completion_ids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[b, :len(c)] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, prompt_lengths=torch.tensor([len(p) for p in prompts]),
                completions=[list(c) for c in completions], packing=Packing.from_mask(attention_mask))


def completion_logps(model, batch, temperature, with_entropy=False):
    """Per-token log-probs of the completion tokens under `model`, at the sampling temperature: (B, C).

    One forward pass over prompt + completion; logits only at the C positions that predict completion tokens
    (position t predicts token t + 1), so the vocabulary projection skips the image and prompt tokens. The
    log-prob is that of softmax(logits / T), the distribution the tokens were drawn from (before top-p).
    Gradients flow unless called under torch.no_grad(). with_entropy also returns the entropy (B, C), detached.
    Padding positions hold garbage; use batch["completion_mask"].
    """
    device = model.lm.embed_tokens.weight.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    completion = batch["completion_ids"].to(device)                                 # (B, C)
    images = {k: v.to(device) for k, v in batch["images"].items()}
    packing = batch["packing"].to(device) if "packing" in batch else None          # made on the CPU, with the batch
    h = model.states(ids, **images, attention_mask=mask, packing=packing)           # (B, T, hidden)
    B, T, D = h.shape
    start = batch["prompt_lengths"].to(device)[:, None] - 1                         # (B, 1)
    pos = (start + torch.arange(completion.shape[1], device=device)[None]).clamp(max=T - 1)  # (B, C)
    h = h.gather(1, pos[..., None].expand(-1, -1, D))                               # (B, C, hidden)
    return token_logps(model, h, completion, temperature, with_entropy)


def shared_prompt_logps(model, batch, temperature, with_entropy=False):
    """completion_logps with each prompt and its images through the model once per group, not once per completion.

    A group's G completions share their prompt, and the prompt (the image tokens and the question, most of each
    row) is what costs: its keys and values are computed once, with gradients, and each completion attends to
    them through a KV cache holding G copies (repeat_interleave, which sums the G copies' gradients on the way
    back). The log-probs, and their gradients, are those of completion_logps, for roughly 1/G of its cost.
    Needs batch["prompts"] (the n_prompts token lists), batch["prompt_images"] (one dict of image inputs per
    prompt, not repeated, as rollout takes them) and completion_ids (n_prompts * G, C) laid out group by group,
    as rollout makes them. The prompts go through model.prefill, which for Qwen2.5-VL also sets the cache's MRoPE
    position offsets: the completions are text, through the plain decoder.
    """
    device = model.lm.embed_tokens.weight.device
    prompts, completion = batch["prompts"], batch["completion_ids"].to(device)      # completion: (B, C)
    P, (B, C) = len(prompts), completion.shape
    G = B // P
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((P, int(lengths.max())), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    mask = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]       # (P, Tp), right-padded
    images = {k: v.to(device) for k, v in cat_images(batch["prompt_images"]).items()}
    lm = model.lm.cfg
    cache = KVCache(lm.num_hidden_layers, P, ids.shape[1] + C, lm.num_key_value_heads, lm.head_dim,
                    dtype=model.lm.embed_tokens.weight.dtype, device=device)
    h = model.prefill(ids, mask, cache, **images)                                   # (P, Tp, hidden)
    h = h[torch.arange(P, device=device), lengths - 1].repeat_interleave(G, 0)[:, None]     # (B, 1, hidden)
    if C > 1:   # tokens 0..C-2 of each completion, after its prompt's cached keys: they predict tokens 1..C-1
        h = torch.cat([h, model.lm.hidden_states(inputs_embeds=model.lm.embed_tokens(completion[:, :-1]),
                                                 cache=cache.repeat_interleave(G))], 1)   # (B, C, hidden)
    return token_logps(model, h, completion, temperature, with_entropy)


def token_logps(model, h, tokens, temperature, with_entropy=False, chunk_bytes=LOGIT_CHUNK_BYTES):
    """States (B, C, hidden) and the tokens they predict (B, C) -> log-probs of the tokens (B, C) at the
    temperature, and with_entropy the entropy (B, C), detached.

    The fp32 logits are made a few rows at a time, about chunk_bytes of them per chunk, and under autograd each
    chunk's are recomputed in the backward pass rather than kept (torch.utils.checkpoint): memory holds one
    chunk's logits, not all of them (64 completions of 256 tokens at Qwen's 152K vocabulary would be 10 GB)."""
    B, C, _ = h.shape
    rows = max(1, chunk_bytes // (4 * C * model.lm.cfg.vocab_size))

    def chunk(hc, tc):
        logits = model.lm.logits(hc).float() / temperature                          # (rows, C, vocab)
        logps = logits.gather(-1, tc[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (rows, C)
        with torch.no_grad():
            return logps, entropy_from_logits(logits.detach()) if with_entropy else None

    parts = [torch.utils.checkpoint.checkpoint(chunk, h[i:i + rows], tokens[i:i + rows], use_reentrant=False)
             if torch.is_grad_enabled() and h.requires_grad else chunk(h[i:i + rows], tokens[i:i + rows])
             for i in range(0, B, rows)]
    logps = torch.cat([p[0] for p in parts])
    return (logps, torch.cat([p[1] for p in parts])) if with_entropy else logps


# ----------------------------------------------------------------------------------------------------------
# Argument checks (kept here so the functions above open with their formulas)

def _check_advantage_args(rewards, group_size, scale):
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size >= 2: a group of one has no std")
    if scale == "batch" and rewards.numel() < 2:
        raise ValueError("scale='batch' needs at least 2 rewards: a batch of one has no std")


def _check_loss_args(logps, old_logps, ref_logps, advantages, mask, beta, eps_low, eps_high, loss_type,
                     max_completion_length):
    if logps.ndim != 2:
        raise ValueError(f"logps must be (B, T), got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logps has {tuple(logps.shape)}")
    if mask is None:
        raise ValueError("mask is required: (B, T), 1 for completion tokens")
    if advantages.shape != (logps.shape[0],):
        raise ValueError(f"advantages must be (B,) = ({logps.shape[0]},), got shape {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the generation cap)")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps (the reference model's log-probs)")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
