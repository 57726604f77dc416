"""Cross-entropy of an output head without holding all its logits.

    loss = linear_cross_entropy(h, weight, targets)   # == F.cross_entropy(h @ weight.T, targets, reduction="sum")

The output head maps each hidden state (C numbers) to one logit per vocabulary entry: V = 151,936 of them for
Qwen2.5. For N labelled tokens that is an N x V matrix, and the plain loss keeps it several times over (the
logits, their fp32 copy, the log-softmax, and in the backward the gradient): about 12 bytes x N x V, 6 GB at
N = 3,300 tokens. Here the rows go through in chunks. Each chunk's logits are made, reduced to the two numbers
per row the loss needs (the log-sum-exp and the target's logit), and dropped. The backward makes them again,
chunk by chunk, and turns them straight into gradients:

    d loss / d logits = softmax(logits) - onehot(target)        (per row; times the incoming gradient)
    d loss / d h      = (d loss / d logits) @ weight
    d loss / d weight = (d loss / d logits)^T @ h

So no more than one chunk of logits exists at any time, at the price of computing them twice: four products
with the head's weight instead of three (forward, recompute, and the two gradients).

Precision follows the plain head: the logits are computed in the compute dtype (the autocast dtype under
torch.autocast, else the weights'), the softmax and the loss in fp32, and the weight's gradient is summed
over chunks in fp32.
"""

import torch

CHUNK_LOGITS = 2 ** 25   # logits per chunk (128 MiB in fp32): 220 rows at V = 151,936; a small vocabulary: one chunk


def linear_cross_entropy(h, weight, targets, chunk_rows=None):
    """h (N, C), weight (V, C), targets (N,) long -> the summed cross-entropy of logits h @ weight.T (fp32 scalar).
    chunk_rows: rows of logits made at a time (default: CHUNK_LOGITS // V)."""
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return LinearCrossEntropy.apply(h, weight, targets, chunk_rows, dtype)


def _logits(h, weight, dtype):
    """(n, C) @ (V, C)^T in the compute dtype, as fp32 (n, V). Explicit casts, autocast off: the backward (which
    runs outside autocast) recomputes exactly what the forward did."""
    with torch.autocast(h.device.type, enabled=False):
        return (h.to(dtype) @ weight.to(dtype).T).float()


class LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, dtype):
        N = h.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)          # log-sum-exp per row, for the backward
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, N, chunk_rows):
            logits = _logits(h[a:a + chunk_rows], weight, dtype)               # (n, V): the only big tensor
            lse[a:a + chunk_rows] = logits.logsumexp(-1)
            picked = logits.gather(1, targets[a:a + chunk_rows, None]).squeeze(1)  # the target's logit
            loss += (lse[a:a + chunk_rows] - picked).sum()
            del logits
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(ctx.dtype)
        for a in range(0, h.shape[0], ctx.chunk_rows):
            hc = h[a:a + ctx.chunk_rows].to(ctx.dtype)                          # (n, C)
            d = _logits(hc, w, ctx.dtype)                                      # (n, V), recomputed
            d.sub_(lse[a:a + ctx.chunk_rows, None]).exp_()                     # softmax, in place
            d[torch.arange(len(hc), device=d.device), targets[a:a + ctx.chunk_rows]] -= 1   # - onehot(target)
            d = d.mul_(grad).to(ctx.dtype)                                     # d loss / d logits
            if need_h:
                dh[a:a + ctx.chunk_rows] = d @ w
            if need_w and d.dtype == dw.dtype:
                dw.addmm_(d.T, hc)                                             # in place: no (V, C) temporary
            elif need_w:
                dw += (d.T @ hc).float()
            del d
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None
