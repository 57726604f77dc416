"""Answers to the exercises of lesson 11 (GRPO). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def rloo_advantages(rewards, G):
    r = torch.as_tensor(rewards).view(-1, G)
    others = (r.sum(1, keepdim=True) - r) / (G - 1)          # mean of the other G - 1
    return (r - others).view(-1)


def wrong_rloo_advantages(rewards, G):
    r = torch.as_tensor(rewards).view(-1, G)
    return (r - r.mean(1, keepdim=True)).view(-1)             # the group mean includes r_i: biased by 1 - 1/G


def k3(logp, ref_logp):
    log_rho = ref_logp - logp                                 # rho = pi_ref / pi at the sample
    return log_rho.exp() - log_rho - 1


def wrong_k3(logp, ref_logp):
    return logp - ref_logp                                    # k1: unbiased, but negative on many samples


def gae_advantages(rewards, values, gamma, lam):
    adv, running = torch.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def wrong_gae_advantages(rewards, values, gamma, lam):
    adv, running = torch.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        running = delta + lam * running                       # forgets gamma in the recursion
        adv[t] = running
    return adv
