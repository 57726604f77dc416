"""Choosing the next token from the model's logits: greedy, temperature, top-k, top-p (nucleus), and a
repetition penalty. One function used by every generate() loop (nanovlm/vlm.py, nanovlm/gpt.py).

Temperature T divides the logits before the softmax: T -> 0 approaches greedy argmax, T = 1 samples the model's
own distribution, T > 1 flattens it. top-k keeps the k most likely tokens; top-p keeps the smallest set of most
likely tokens whose probability adds up to at least p (so a confident model keeps one token and an unsure one
keeps many). Both cut the unreliable tail that makes long samples drift.
"""

import torch


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seen=None, generator=None):
    """Pick one token per row from logits (B, vocab): greedy when temperature == 0, else sample from the
    softmax at that temperature restricted to the top_k tokens and to the smallest set holding top_p of the
    probability (nucleus). repetition_penalty > 1 makes tokens already in `seen` (B, S; -1 = none) less likely."""
    top_k, top_p = top_k or 0, 1.0 if top_p is None else top_p   # None means off, as 0 / 1.0 do
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        hits = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), (seen >= 0).float())  # (B, vocab)
        # CTRL's rule: shrink positive logits, grow negative ones, so a seen token always loses probability.
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(hits > 0, penalised, logits)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep a token if the mass before it is < top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row, placed on the cumulative distribution (torch.multinomial
    # would draw one random number per vocabulary entry: 151,936 a row for every token). side="right" never
    # lands on a token of probability 0 (its cumulative sum equals its left neighbour's).
    cdf = logits.softmax(-1).cumsum(-1)                                                        # (B, vocab)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
