"""Cross-entropy of an output head without holding all its logits.

    loss = linear_cross_entropy(h, weight, targets)   # == F.cross_entropy(h @ weight.T, targets, reduction="sum")

The output head maps each hidden state (C numbers) to one logit per vocabulary entry: V = 151,936 of them for
Qwen2.5. For N labelled tokens that is an N x V matrix, and the plain loss keeps it several times over (the
logits, their fp32 copy, the log-softmax, and in the backward the gradient): about 12 bytes x N x V, 6 GB at
N = 3,300 tokens. Here the rows go through in chunks, and each chunk's logits are used up at once. The loss needs
two numbers per row (the log-sum-exp and the target's logit); the gradient is known in closed form as soon as
the logits are,

    d loss / d logits = softmax(logits) - onehot(target)        (per row)
    d loss / d h      = (d loss / d logits) @ weight
    d loss / d weight = (d loss / d logits)^T @ h

so it is computed in the same pass (when gradients are wanted), the chunk's logits dropped, and the backward
only scales the two gradients by the incoming one. No more than one chunk of logits ever exists, and the head
costs the same three products as the plain loss (forward, and the two gradients).

Precision follows the plain head: the logits are computed in the compute dtype (the autocast dtype under
torch.autocast, else the weights'), the softmax and the loss in fp32, and the weight's gradient is summed over
chunks in fp32.
"""

import torch

# Logits per chunk: 1 GiB in fp32, 1,766 rows at V = 151,936 (a small vocabulary: one chunk). Each chunk adds its
# share into the (V, C) weight gradient, a pass over V x C numbers: with fewer rows a chunk, that pass would cost
# more than the chunk's products do on a GPU.
CHUNK_LOGITS = 2 ** 28


def linear_cross_entropy(h, weight, targets, chunk_rows=None):
    """h (N, C), weight (V, C), targets (N,) long -> the summed cross-entropy of logits h @ weight.T (fp32 scalar).
    chunk_rows: rows of logits made at a time (default: CHUNK_LOGITS // V)."""
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, chunk_rows, dtype)
    return loss_and_gradients(h, weight, targets, chunk_rows, dtype, False, False)[0]   # evaluation: no gradients


def loss_and_gradients(h, weight, targets, chunk_rows, dtype, need_h, need_w):
    """The summed loss and, where asked, its gradients with respect to h (N, C) and weight (V, C), one chunk of
    rows at a time."""
    N = h.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    # The weight's gradient is summed over chunks in fp32; a single chunk needs no sum: the weight's dtype, as plain.
    dw_dtype = weight.dtype if N <= chunk_rows else torch.float32
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if need_w else None
    w = weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):   # explicit casts instead (the same products autocast makes)
        for a in range(0, N, chunk_rows):
            hc, t = h[a:a + chunk_rows].to(dtype), targets[a:a + chunk_rows]                # (n, C), (n,)
            logits = (hc @ w.T).float()                                                  # (n, V): the only big tensor
            lse = logits.logsumexp(-1)                                                   # (n,)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                d = logits.sub_(lse[:, None]).exp_()                                     # softmax, in place
                d[torch.arange(len(t), device=d.device), t] -= 1                         # - onehot(target)
                d = d.to(dtype)
                if need_h:
                    dh[a:a + chunk_rows] = d @ w
                if need_w and d.dtype == dw.dtype:
                    dw.addmm_(d.T, hc)                                                   # in place: no (V, C) temporary
                elif need_w:
                    dw += d.T @ hc                      # a bf16 (V, C) product, added into the fp32 sum in place
                del d
            del logits   # now, not when the next chunk's are assigned: one chunk alive at a time
    return loss, dh, dw


class LinearCrossEntropy(torch.autograd.Function):
    """The forward computes the loss and its gradients (loss_and_gradients); the backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, dtype):
        loss, dh, dw = loss_and_gradients(h, weight, targets, chunk_rows, dtype, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:   # the gradients are scaled in place, so they serve one backward
            raise RuntimeError("linear_cross_entropy supports one backward pass (its gradients come from the forward)")
        ctx.used = True
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh.mul_(grad), None if dw is None else dw.mul_(grad).to(ctx.weight_dtype),
                None, None, None)
