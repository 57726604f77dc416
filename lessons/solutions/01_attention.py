"""Answers to the exercises of lesson 1 (attention). Each `wrong_*` is a plausible mistake its checker catches."""

import math

import torch


def causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).tril()             # query t sees keys 0..t: on and below the diagonal


def wrong_causal_mask(T):
    return torch.ones(T, T, dtype=torch.bool).triu()             # the transpose: every query sees the future


def kv_cache_bytes(n_layers, batch, seq_len, n_kv_heads, head_dim, bytes_per_value):
    return 2 * n_layers * batch * seq_len * n_kv_heads * head_dim * bytes_per_value   # 2: keys and values


def wrong_kv_cache_bytes(n_layers, batch, seq_len, n_kv_heads, head_dim, bytes_per_value):
    return n_layers * batch * seq_len * n_kv_heads * head_dim * bytes_per_value       # keys only


def online_softmax(scores, values, block):
    m, l, o = torch.tensor(-math.inf), torch.tensor(0.0), torch.zeros(values.shape[1])
    for start in range(0, len(scores), block):
        s, v = scores[start:start + block], values[start:start + block]
        m_new = torch.maximum(m, s.max())
        correction = torch.exp(m - m_new)                          # rescale what was summed under the old max
        l = correction * l + torch.exp(s - m_new).sum()
        o = correction * o + (torch.exp(s - m_new)[:, None] * v).sum(0)
        m = m_new
    return o / l


def wrong_online_softmax(scores, values, block):
    l, o = torch.tensor(0.0), torch.zeros(values.shape[1])
    for start in range(0, len(scores), block):                     # no running max: exp(1000) overflows
        s, v = scores[start:start + block], values[start:start + block]
        l = l + torch.exp(s).sum()
        o = o + (torch.exp(s)[:, None] * v).sum(0)
    return o / l
