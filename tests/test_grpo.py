"""grpo.py against hand-computed values: advantages, the four loss normalisations, PPO clipping, k3, gradients."""

import math

import pytest
import torch

from nanovlm.grpo import (entropy_from_logits, frac_zero_std_groups, group_advantages, grpo_loss, mask_after_eos,
                          masked_mean)


# ---------------------------------------------------------------------------------------------- advantages

def test_group_advantages_closed_form():
    # mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735: 0.5 / (0.57735 + 1e-4) = 0.86588
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert expected == pytest.approx(0.86588, abs=1e-5)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.86588, atol=1e-5, rtol=0)
    assert adv.dtype == torch.float32 and adv.shape == (4,)


def test_group_advantages_equal_rewards_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.2])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, group_size=3, scale=scale)
        assert (adv[:6] == 0).all(), scale
        assert (adv[6:] != 0).all(), scale


def test_group_advantages_scales_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])  # groups [1, 0] and [3, 2]: means 0.5 and 2.5
    none = group_advantages(rewards, group_size=2, scale="none")
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 0.5, -0.5]))
    # group std of [1, 0] with Bessel: sqrt(0.5)
    group = group_advantages(rewards, group_size=2, scale="group")
    assert torch.allclose(group, torch.tensor([0.5, -0.5, 0.5, -0.5]) / (math.sqrt(0.5) + 1e-4))
    # batch: mean 1.5, squared deviations 0.25 + 2.25 + 2.25 + 0.25 = 5, / 3 -> std sqrt(5/3)
    batch = group_advantages(rewards, group_size=2, scale="batch", eps=0.0)
    assert torch.allclose(batch, torch.tensor([0.5, -0.5, 0.5, -0.5]) / math.sqrt(5 / 3))
    # a list and an integer tensor work too
    assert torch.allclose(group_advantages([1, 0, 1, 0], 4), torch.tensor([1.0, -1, 1, -1]) * 0.86588, atol=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="5 rewards do not split into groups of group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_frac_zero_std_groups():
    assert frac_zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 3.0]), 2) == 0.75
    assert frac_zero_std_groups(torch.tensor([0.0, 1.0]), 2) == 0.0
    with pytest.raises(ValueError):
        frac_zero_std_groups(torch.zeros(3), 2)


# ---------------------------------------------------------------------------------------------- loss

def unequal_batch():
    """Two completions of lengths 1 and 3, every ratio inside the clip range, garbage at the padding."""
    deltas = [[0.1], [0.05, -0.1, 0.15]]
    A = [1.0, -2.0]
    logps = torch.tensor([[0.1, -float("inf"), float("nan")], [0.05, -0.1, 0.15]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    # inside the clip range the per-token loss is -ratio * A
    per = [[-math.exp(d) * a for d in row] for row, a in zip(deltas, A)]
    return logps, old, torch.tensor(A, dtype=torch.float64), mask, per


def test_loss_types_normalise_as_documented():
    logps, old, adv, mask, per = unequal_batch()
    total = sum(sum(row) for row in per)
    expected = {
        "grpo": (per[0][0] / 1 + sum(per[1]) / 3) / 2,
        "bnpo": total / 4,
        "dr_grpo": total / (2 * 5),
        "dapo": total / 4,
    }
    got = {t: grpo_loss(logps, old, None, adv, mask, loss_type=t, max_completion_length=5)[0].item()
           for t in expected}
    assert got == pytest.approx(expected, rel=1e-12)
    assert len({round(got[t], 9) for t in ("grpo", "bnpo", "dr_grpo")}) == 3  # they really differ here
    # dapo over the whole generation batch: 10 tokens across micro-batches, this one holds 4
    dapo = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=10)[0].item()
    assert dapo == pytest.approx(total / 10, rel=1e-12)


def test_metrics():
    logps, old, adv, mask, _ = unequal_batch()
    _, m = grpo_loss(logps, old, None, adv, mask)
    assert m["completion_length"] == 2.0
    assert m["clip_ratio_low"] == m["clip_ratio_high"] == m["clip_ratio_region"] == 0.0
    assert "kl" not in m and all(isinstance(v, float) for v in m.values())
    # tokens 0,1 pushed past the bound in A's direction, token 2 past it against A (not clipped), 3 inside
    logps = torch.tensor([[0.5, -0.5, 0.5, 0.0]])
    for a, key in ((1.0, "clip_ratio_high"), (-1.0, "clip_ratio_low")):
        lp = logps if a > 0 else -logps
        _, m = grpo_loss(lp, torch.zeros(1, 4), None, torch.tensor([a]), torch.ones(1, 4))
        assert m[key] == 0.5 and m["clip_ratio_region"] == 0.5
    ref = torch.tensor([[0.3, 0.0, 0.0, 0.0]])
    _, m = grpo_loss(torch.zeros(1, 4), None, ref, torch.tensor([1.0]), torch.tensor([[1, 1, 0, 0]]), beta=0.1)
    assert m["kl"] == pytest.approx((math.exp(0.3) - 0.3 - 1) / 2)


def clip_case(delta, a, eps_low=0.2, eps_high=0.2):
    logps = torch.tensor([[delta]], dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([a], dtype=torch.float64),
                        torch.ones(1, 1), eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    return loss.item(), logps.grad.item()


def test_clipping_stops_the_gradient_exactly_where_ppo_says():
    r_hi, r_lo, r_in = math.exp(0.5), math.exp(-0.5), math.exp(0.1)
    # ratio above 1 + eps with A > 0: clipped, loss -1.2 * A, zero gradient
    assert clip_case(0.5, 1.0) == (pytest.approx(-1.2), 0.0)
    # ratio below 1 - eps with A < 0: clipped, loss -0.8 * A, zero gradient
    assert clip_case(-0.5, -1.0) == (pytest.approx(0.8), 0.0)
    # past the bound against the advantage: the unclipped term is the smaller one, gradient -A * ratio
    assert clip_case(0.5, -1.0) == (pytest.approx(r_hi), pytest.approx(r_hi))
    assert clip_case(-0.5, 1.0) == (pytest.approx(-r_lo), pytest.approx(-r_lo))
    # inside the range: gradient -A * ratio
    assert clip_case(0.1, 2.0) == (pytest.approx(-2 * r_in), pytest.approx(-2 * r_in))
    assert clip_case(0.1, -2.0) == (pytest.approx(2 * r_in), pytest.approx(2 * r_in))
    # asymmetric bounds (DAPO's clip-higher): ratio 1.246 is clipped with eps_high 0.2, not with 0.28
    assert clip_case(0.22, 1.0, eps_high=0.2)[1] == 0.0
    assert clip_case(0.22, 1.0, eps_high=0.28)[1] == pytest.approx(-math.exp(0.22))


def test_k3_is_zero_with_zero_gradient_when_policy_is_reference():
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = logps.detach().clone()
    loss, m = grpo_loss(logps, None, ref, torch.zeros(3, dtype=torch.float64), torch.ones(3, 5), beta=0.5)
    loss.backward()
    assert loss.item() == 0.0 and m["kl"] == 0.0
    assert (logps.grad == 0).all()
    # away from the reference, k3 = exp(d) - d - 1 with d = ref - logp, gradient beta * (1 - exp(d)) / T
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    loss, _ = grpo_loss(logps, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), beta=0.5)
    loss.backward()
    d = [-0.5, 1.0]
    assert loss.item() == pytest.approx(0.5 * sum(math.exp(x) - x - 1 for x in d) / 2)
    assert logps.grad[0].tolist() == pytest.approx([0.5 * (1 - math.exp(x)) / 2 for x in d])


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # ratios well inside the clip range or well outside it (0.6 away), never near the kinks at 0.8 / 1.2
    delta = (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.2
    delta[0, 1], delta[1, 2], delta[2, 0] = 0.6, -0.6, 0.6
    ref = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        def f(lp):
            return grpo_loss(lp, old, ref, adv, mask, beta=0.1, loss_type=loss_type, max_completion_length=T)[0]
        assert torch.autograd.gradcheck(f, ((old + delta).requires_grad_(),), eps=1e-6, atol=1e-8), loss_type


def test_on_policy_gradient_is_advantage_over_length():
    lengths, A = [2, 4], [0.7, -1.3]
    logps = torch.tensor([[-0.5, -1.0, -9.0, -9.0], [-0.1, -0.2, -0.3, -0.4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    loss, m = grpo_loss(logps, None, None, torch.tensor(A), mask)
    loss.backward()
    # ratio == 1, so the loss is -mean(A) and d loss / d logp = -A_i / (len_i * B) on the completion tokens
    assert loss.item() == pytest.approx(-sum(A) / 2)
    expected = torch.tensor([[-A[0] / (2 * 2)] * 2 + [0.0] * 2, [-A[1] / (4 * 2)] * 4])
    assert torch.allclose(logps.grad, expected)
    assert m["completion_length"] == sum(lengths) / 2


def test_grpo_loss_errors():
    x, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(x, None, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(x, None, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(x, None, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        grpo_loss(x, None, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask has shape"):
        grpo_loss(x, None, None, adv, torch.ones(2, 4))
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(x, torch.zeros(2, 2), None, adv, mask)


# ---------------------------------------------------------------------------------------------- helpers

def test_mask_after_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 5, 5, 5, 5], [5, 3, 2, 9, 9]])
    assert mask_after_eos(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mask_after_eos(ids, [3, 2]).tolist()[3] == [1, 1, 0, 0, 0]  # whichever end token comes first


def test_masked_mean_and_entropy():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == 1.5
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), expected, atol=1e-6)
    assert entropy_from_logits(torch.zeros(1, 1, 5)).item() == pytest.approx(math.log(5))
    banned = torch.tensor([[[0.0, 0.0, -float("inf")]]])
    assert entropy_from_logits(banned).item() == pytest.approx(math.log(2))
