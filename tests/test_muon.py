"""Muon: Newton-Schulz against the SVD, a step against torch.optim.Muon, the AdamW groups against torch.optim.AdamW."""

import pytest
import torch

from nanovlm import train_utils as tu
from nanovlm.muon import NS_COEFFICIENTS, Muon, orthogonalize


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 24, 40)])   # the last: a stack, each on its own
def test_orthogonalize_keeps_singular_vectors_and_maps_singular_values(shape):
    # Closed form: the iteration never touches U and V; each singular value s / ||G||_F goes through the scalar
    # polynomial x -> a x + b x^3 + c x^5 five times.
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = orthogonalize(G)
    inner = U.mT @ O @ Vh.mT                                # diagonal if O = U diag(s') V^T
    x = S / torch.linalg.matrix_norm(G)[..., None]           # each matrix by its own Frobenius norm
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    torch.testing.assert_close(inner, torch.diag_embed(x), atol=1e-6, rtol=1e-6)
    assert x.min() > 0.68 and x.max() < 1.21                  # near-orthogonal: the step has every direction


def test_muon_step_matches_torch_muon():
    # torch.optim.Muon with Moonshot's rule scales the update to RMS 0.2 lr; ours to RMS lr: same step at 5x lr.
    # torch runs Newton-Schulz in bfloat16, hence the tolerance. Three matrices, two of one shape in two groups
    # with their own lr (orthogonalised as one stack), one of another: each must step as if alone.
    torch.manual_seed(0)
    shapes, lrs = [(16, 48), (16, 48), (48, 16)], [1e-2, 3e-3, 1e-2]
    w0 = [torch.randn(s) for s in shapes]
    ours = [w.clone().requires_grad_() for w in w0]
    refs = [w.clone().requires_grad_() for w in w0]
    opt = Muon([{"params": [ours[0], ours[2]], "muon": True, "lr": 1e-2},
                {"params": [ours[1]], "muon": True, "lr": 3e-3}])
    ref_opts = [torch.optim.Muon([r], lr=5 * lr, weight_decay=0.0, momentum=0.95, adjust_lr_fn="match_rms_adamw")
                for r, lr in zip(refs, lrs)]
    for step in range(3):
        for o, r, s in zip(ours, refs, shapes):
            g = torch.randn(s)
            o.grad, r.grad = g.clone(), g.clone()
        opt.step()
        for ref_opt in ref_opts:
            ref_opt.step()
        if step == 0:   # one step: singular values 0.68-1.2, so its RMS is that times lr
            for o, w, lr in zip(ours, w0, lrs):
                assert 0.68 * lr < (o.detach() - w).pow(2).mean().sqrt().item() < 1.2 * lr
    for o, r, w, lr in zip(ours, refs, w0, lrs):
        torch.testing.assert_close(o.detach() - w, r.detach() - w, atol=0.2 * lr, rtol=0.05)


def test_muon_weight_decay_is_decoupled():
    w = torch.ones(4, 6, requires_grad=True)
    opt = Muon([{"params": [w], "muon": True, "weight_decay": 0.5}], lr=0.1)
    w.grad = torch.zeros(4, 6)                               # no gradient: only the decay moves the weights
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 6), 1 - 0.1 * 0.5))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8))
    b = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8))
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [m[0].weight], "weight_decay": 0.1}, {"params": list(m[1].parameters())}]  # noqa
    ours = Muon(groups(a), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(b), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    x = torch.randint(0, 10, (5,))
    for _ in range(4):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(3).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6)


def test_make_optimizer_sends_matrices_to_muon():
    emb, lin = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3)
    opt = tu.make_optimizer([("m", [*emb.parameters(), *lin.parameters()], 1e-3)], weight_decay=0.1,
                            muon_params=[lin.weight])
    assert isinstance(opt, Muon)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["m_muon"]["params"] == [lin.weight] and groups["m_muon"]["muon"]
    assert groups["m"]["params"] == [emb.weight] and not groups["m"]["muon"]         # embeddings stay on AdamW
    assert groups["m_no_decay"]["params"] == [lin.bias] and groups["m_no_decay"]["weight_decay"] == 0.0
    assert isinstance(tu.make_optimizer([("m", lin.parameters(), 1e-3)]), torch.optim.AdamW)   # no matrices: AdamW
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [lin.bias], "muon": True}])
