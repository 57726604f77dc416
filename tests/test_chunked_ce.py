"""linear_cross_entropy: the plain cross-entropy of h @ W^T in value and gradients, without ever holding more than
one chunk of logits (tensor accounting at Qwen2.5's vocabulary, 151,936)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import PeakMemory
from nanovlm import chunked_ce
from nanovlm.chunked_ce import linear_cross_entropy
from nanovlm.qwen2 import Qwen2Config
from nanovlm.siglip import SiglipConfig
from nanovlm.vlm import VLM, VLMConfig


def case(N=37, V=50, C=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, C, generator=g, dtype=dtype).requires_grad_()
    return h, w, torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100, None])
def test_equals_plain_cross_entropy_in_value_and_gradients(chunk_rows):
    h, w, t = case()
    loss = linear_cross_entropy(h, w, t, chunk_rows)
    dh, dw = torch.autograd.grad(2.5 * loss, (h, w))                   # an incoming gradient that is not 1
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, t, reduction="sum")             # the definition, in float64
    rh, rw = torch.autograd.grad(2.5 * ref, (h64, w64))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-4 * ref.item()
    assert (dh.double() - rh).abs().max() < 1e-5 and (dw.double() - rw).abs().max() < 1e-5


def test_no_rows_is_zero_with_zero_gradients():
    h, w, t = case(N=0)
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_under_autocast_it_follows_the_plain_head():
    """CPU autocast in bf16 with fp32 weights: logits in bf16 as the plain Linear would make them, loss in fp32;
    value and gradients equal the plain path's up to bf16 rounding."""
    h, w, t = case(N=64, V=300, C=32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
        plain = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    got, want = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(plain, (h, w))
    assert abs(loss.item() - plain.item()) < 1e-3 * plain.item()
    for g, r in zip(got, want):
        assert g.dtype == torch.float32 and (g - r).abs().max() < 2e-2 * r.abs().max()


def qwen_vocab_vlm():
    """The VLM's loss path at Qwen2.5's vocabulary, with a narrow LM (hidden 32) so the weights stay small."""
    lm = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
    vision = SiglipConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4)
    return VLM(VLMConfig(lm=lm, vision=vision, image_token_id=5, stop_token_ids=(3,), pad_token_id=0))


def test_peak_memory_stays_under_one_chunk_of_logits_at_qwen_vocab(monkeypatch):
    """VLM.outputs, forward and backward, at vocab 151,936 and 500 labelled tokens. The plain loss would hold
    500 x 151,936 fp32 logits (304 MB) two or three times over; here the peak is bounded by what lives at
    once: one chunk of logits in fp32 (CHUNK_LOGITS x 4 bytes, set to 128 MiB here so that 500 rows make three
    chunks; the softmax is made in place inside it)
    plus the head's weight gradient (V x C fp32, 19 MB) plus the per-row vectors (kilobytes). The bound allows
    10% over that. It does not grow with the number of tokens (measured: 146 MiB at 500 and at 1,000). The same
    probe sees the plain loss's whole logits (checked on 200 rows, to keep the test light)."""
    monkeypatch.setattr(chunked_ce, "CHUNK_LOGITS", 2 ** 25)           # 220 rows a chunk: several chunks here
    m = qwen_vocab_vlm()
    V, C = 151936, 32
    h = torch.randn(2, 270, C, requires_grad=True)
    labels = torch.randint(0, V, (2, 270))
    labels[:, :20] = -100                                              # 2 x 250 labelled next tokens
    weight_bytes = V * C * 4
    bound = 1.1 * (chunked_ce.CHUNK_LOGITS * 4 + weight_bytes)
    with PeakMemory() as mem:
        out = m.outputs(h, labels)
        out["loss"].backward()
    assert int(out["n_tokens"]) == 500
    assert mem.peak < bound, f"peak {mem.peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert mem.peak > chunked_ce.CHUNK_LOGITS * 4                       # it did make a chunk's logits
    hp = h[:, :100].detach().reshape(200, C).requires_grad_()
    with PeakMemory() as plain:
        F.cross_entropy(m.lm.logits(hp).float(), labels[:, 1:101].reshape(-1), reduction="sum").backward()
    assert plain.peak > 2 * 200 * V * 4                                 # the probe sees whole logits tensors
