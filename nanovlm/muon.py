"""Muon: orthogonalised momentum for the weight matrices, AdamW for every other parameter, in one optimizer.

    from nanovlm.muon import Muon
    opt = Muon([{"params": matrices, "lr": 5e-4, "weight_decay": 0.01, "muon": True},    # nn.Linear weights
                {"params": others, "lr": 5e-4, "weight_decay": 0.0}])                     # embeddings, norms, biases

AdamW scales each coordinate of the update by its own running gradient size. A weight matrix's gradient is
dominated by a few directions (its top singular vectors), so most of what Adam's step does goes into the
features the model already uses, and a feature that is weak now (in the tiny VLM: colour, an object's place) is
slow to grow. Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) keeps a momentum buffer M per
matrix and steps along the orthogonal matrix nearest to it: M = U S V^T -> U V^T. Every direction of the update
then has the same size, whatever the gradient's spectrum.

U V^T is found without an SVD by a Newton-Schulz iteration: X <- a X + b (X X^T) X + c (X X^T)^2 X maps each
singular value s of X (in (0, 1] after dividing by the Frobenius norm) through the polynomial a s + b s^3 + c s^5
and leaves the singular vectors alone. Keller's coefficients push small singular values up fast: 5 steps put
every one above ~1.5e-3 of the norm into [0.68, 1.21]. Not exactly 1 (p(1) = 0.701: the iteration oscillates by
design rather than converging), which training does not mind, for 15 matrix products instead of an SVD.

Step size. An orthogonal A x B matrix has RMS 1 / sqrt(max(A, B)); we scale it by sqrt(max(A, B)) so the update
of every matrix has an RMS of about lr, whatever its shape. (Moonshot's `match_rms_adamw` rule, used by
torch.optim.Muon, scales to 0.2 lr, the RMS they measured for AdamW's updates; so lr here is 0.2 x theirs.)

The update is the same on every DDP rank (gradients are averaged first), so each rank computes it on its own.
The Newton-Schulz products run in float32: torch.optim.Muon runs them in bfloat16, which is fast on GPUs and
several times slower on CPUs without bfloat16 units (docs/experiments.md). step() orthogonalises matrices of
the same shape as one stacked product, fewer and larger matrix products than one per matrix.
"""

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, eps=1e-7):
    """(..., A, B) matrices -> approximately U V^T of each one's SVD G = U S V^T (singular values ~0.68-1.21, not 1).
    A stack of same-shape matrices goes through as one batched product: fewer, larger matmuls."""
    a, b, c = NS_COEFFICIENTS
    X = G.float() / (G.norm(dim=(-2, -1), keepdim=True) + eps)   # every singular value now <= 1: converges
    tall = X.size(-2) > X.size(-1)
    if tall:                           # iterate on the wide side: X X^T is the smaller square
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT                   # (..., min, min)
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Param groups with "muon": True get Muon (2-D weights only); every other group gets AdamW, written out
    the way torch.optim.AdamW computes it. Each group has its own lr and weight_decay (decoupled in both)."""

    def __init__(self, param_groups, lr=1e-3, weight_decay=0.0, momentum=0.95, betas=(0.9, 0.95), eps=1e-8,
                 ns_steps=5):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps,
                        ns_steps=ns_steps, muon=False)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            if g["muon"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon updates 2-D weight matrices only; put other parameters in an AdamW group")

    @torch.no_grad()
    def step(self):
        # Matrices of one shape are orthogonalised together (whatever their group: Newton-Schulz does not
        # depend on lr): a few large batched products instead of many small ones (docs/experiments.md, Muon).
        by_shape = {}
        for g in self.param_groups:
            for p in g["params"] if g["muon"] else ():
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), g["ns_steps"]), []).append((p, g))
        for pairs in by_shape.values():
            self._muon(pairs)
        for g in self.param_groups:
            if not g["muon"]:
                self._adamw(g)

    def _muon(self, pairs):
        """pairs: [(param, its group), ...], all params of one shape."""
        for p, g in pairs:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            state["momentum_buffer"].lerp_(p.grad, 1 - g["momentum"])              # M = mu M + (1 - mu) G
        # Nesterov: look ahead along the momentum
        update = torch.stack([p.grad.lerp(self.state[p]["momentum_buffer"], g["momentum"]) for p, g in pairs])
        update = orthogonalize(update, pairs[0][1]["ns_steps"])  # (n, A, B), RMS ~ 1 / sqrt(max(A, B))
        for (p, g), u in zip(pairs, update):
            p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(u, alpha=-g["lr"] * max(p.shape) ** 0.5)     # RMS of the step ~ lr

    def _adamw(self, g):
        beta1, beta2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            p.mul_(1 - g["lr"] * g["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(g["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / (1 - beta1 ** t))
