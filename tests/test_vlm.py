"""The VLM: projector reshapes, image splicing, the masked loss, generation with the KV cache, sampling rules."""
import pytest
import torch
import torch.nn.functional as F

from conftest import cuda, greedy_by_full_forward, tiny_config
from nanovlm.data import pack
from nanovlm.projector import pixel_shuffle
from nanovlm.sampling import sample_next
from nanovlm.vlm import VLM

IMG = 5  # image-pad id in these tests


def tiny_vlm(seed=0, slot_embedding=False):
    torch.manual_seed(seed)
    cfg = tiny_config(projector=dict(slot_embedding=slot_embedding))
    return VLM(cfg).eval()


def test_pixel_shuffle_by_hand():
    # a 4x4 grid of 1-channel patches numbered 0..15 in reading order
    x = torch.arange(16.0).view(1, 16, 1)
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 12, 1), 2)


def test_image_tokens_and_splicing():
    m = tiny_vlm()
    assert m.cfg.image_tokens == 4          # 32/8 = 4x4 patches -> shuffle 2 -> 2x2
    ids = torch.tensor([[1, 2, IMG, IMG, IMG, IMG, 7, 0], [1, IMG, IMG, IMG, IMG, 9, IMG, IMG]])
    ids[1, -2:] = torch.tensor([IMG, IMG])
    pix = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[4, 6\] image-pad tokens per row"):
        m.embed(ids, pix)                   # 10 slots, 2 images x 4 = 8
    ids[1, -2:] = torch.tensor([9, 9])
    x = m.embed(ids, pix)
    feats = m.projector(m.vision(pix))      # (2, 4, 32)
    assert torch.equal(x[0, 2:6], feats[0]) and torch.equal(x[1, 1:5], feats[1])
    text = m.lm.embed_tokens(ids)
    keep = ids != IMG
    assert torch.equal(x[keep], text[keep])
    with pytest.raises(ValueError, match=r"image tokens do not match images: .* 1 image\(s\) x 4 tokens each = 4"):
        m.embed(ids, pix[:1])


def test_slot_embedding_tells_identical_cells_apart():
    m = tiny_vlm(slot_embedding=True)
    assert m.projector.slot_embed.shape == (4, 32)            # one vector per image token, the LM's width
    # An image whose four 16x16 quarters are the same picture: every quarter is patch-for-patch identical content.
    quarter = torch.randn(3, 16, 16)
    pix = quarter.repeat(1, 2, 2)[None]                        # (1, 3, 32, 32)
    p = m.projector
    mlp_only = lambda pix: p.fc2(p.act(p.fc1(pixel_shuffle(m.vision(pix), 2))))   # noqa: E731  (1, 4, 32)
    with torch.no_grad():
        mlp, out = mlp_only(pix), p(m.vision(pix))
    # by hand: token i = the MLP's output for cell i + slot vector i
    assert torch.allclose(out[0], mlp[0] + m.projector.slot_embed, atol=1e-6)
    with torch.no_grad():   # with the ViT's own positions zeroed, identical cells give identical MLP outputs ...
        m.vision.embeddings.position_embedding.weight.zero_()
        mlp, out = mlp_only(pix), p(m.vision(pix))
    assert torch.allclose(mlp[0, 0], mlp[0, 3], atol=1e-5)
    # ... and only the slot embedding still tells them apart, by exactly the difference of the two slot vectors
    assert torch.allclose(out[0, 3] - out[0, 0], m.projector.slot_embed[3] - m.projector.slot_embed[0], atol=1e-5)
    with pytest.raises(ValueError, match="slot embeddings for 4 image tokens, got 16"):
        m.projector(torch.zeros(1, 64, 24))                    # an 8x8 patch grid: 16 tokens
    assert tiny_vlm().projector.slot_embed is None             # off by default (what official recipes use)


def test_loss_is_masked_next_token_cross_entropy():
    m = tiny_vlm()
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 8, 9, 10, 3], [1, 11, 12, 13, 14, 15, 3, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:7] = ids[1, 4:7]
    mask = ids != 0
    mask[1, -2:] = False
    pix = torch.randn(1, 3, 32, 32)
    out = m(ids, pix, attention_mask=mask, labels=labels)
    logits = m(ids, pix, attention_mask=mask)["logits"]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out["loss"], want, atol=1e-6)
    assert int(out["n_tokens"]) == 6


def test_packed_batch_loss_and_gradients_equal_each_sample_alone():
    """Three samples (two with an image, one text-only) packed into rows of 12 by data.pack: the loss is the
    token-weighted mean of each sample's loss computed alone, unpadded, and so are the gradients."""
    m = tiny_vlm().train()
    pix = torch.randn(2, 3, 32, 32)
    seqs = [[1, IMG, IMG, IMG, IMG, 8, 9, 10, 3], [1, 11, 12, 3], [1, IMG, IMG, IMG, IMG, 13, 3]]
    first_label = [6, 2, 5]
    items = []
    for s, f, img in zip(seqs, first_label, [pix[:1], pix[:0], pix[1:]]):
        ids = torch.tensor(s)
        labels = torch.full_like(ids, -100)
        labels[f:] = ids[f:]
        items.append(dict(input_ids=ids, labels=labels, images={"pixel_values": img}, where="x"))
    b = pack(items, pad_id=0, max_length=12)
    assert b["input_ids"].shape == (2, 11) and b["attention_mask"].max() == 2   # 9 | 7 + 4 share a row
    out = m(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    params = [p for p in m.parameters() if p.requires_grad]
    got = torch.autograd.grad(out["loss"], params, allow_unused=True)
    total, n = 0.0, 0
    for it in items:
        o = m(it["input_ids"][None], it["images"]["pixel_values"], labels=it["labels"][None])
        total, n = total + o["loss"] * o["n_tokens"], n + o["n_tokens"]
    assert int(out["n_tokens"]) == n and torch.allclose(out["loss"], total / n, atol=1e-6)
    want = torch.autograd.grad(total / n, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is not None and w.abs().max() > 1e-6:   # (attention key biases get only rounding noise)
            assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7


def test_batched_cached_generation_equals_full_forward():
    m = tiny_vlm(seed=1)
    pix = torch.randn(2, 3, 32, 32)
    prompts = [[1, 2, IMG, IMG, IMG, IMG, 7], [1, 9, 10], [1, IMG, IMG, IMG, IMG, 9, 9, 9, 9, 4, 11]]
    out = m.generate(prompts, pix, max_new_tokens=6)
    assert out[0] == greedy_by_full_forward(m, prompts[0], pix[:1], 6)
    assert out[1] == greedy_by_full_forward(m, prompts[1], None, 6)
    assert out[2] == greedy_by_full_forward(m, prompts[2], pix[1:], 6)
    streamed = {0: [], 1: [], 2: []}
    m.generate(prompts, pix, max_new_tokens=6, on_token=lambda b, t: streamed[b].append(t))
    assert [streamed[b] for b in range(3)] == out


def test_stop_token_ends_a_row():
    m = tiny_vlm()
    with torch.no_grad():   # make token 3 (the stop id) the argmax everywhere: nothing is returned
        m.lm.embed_tokens.weight[3] = 0
        m.lm.norm.weight.fill_(1.0)
    logits_bias = torch.zeros(48)
    logits_bias[3] = 1e4
    m.lm.logits = lambda h: F.linear(h, m.lm.embed_tokens.weight) + logits_bias
    assert m.generate([[1, 2], [1, 4, 6]], None, max_new_tokens=5) == [[], []]


def test_generation_never_emits_an_image_pad():
    """A sampled image-pad would leave the text one image short when the sequence is fed back (GRPO does)."""
    m = tiny_vlm()
    bias = torch.zeros(48)
    bias[IMG] = 1e4   # the image-pad is everyone's favourite next token
    m.lm.logits = lambda h: F.linear(h, m.lm.embed_tokens.weight) + bias
    prompt = [1, 2, 7]
    assert int(m(torch.tensor([prompt]))["logits"][0, -1].argmax()) == IMG   # unmasked, it would be chosen
    out = m.generate([prompt], None, max_new_tokens=4)[0]
    assert IMG not in out and out == greedy_by_full_forward(m, prompt, None, 4)   # argmax among the others
    sampled = m.generate([prompt] * 8, None, max_new_tokens=4, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert all(IMG not in row for row in sampled)


def test_sample_next_rules_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert int(sample_next(logits)) == 0                       # greedy
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}                                     # only the two best
    p = torch.softmax(logits[0], 0)                            # p0 = .636, p0 + p1 = .870
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1} and p[0] < 0.8 < p[0] + p[1]        # smallest set with >= 80% of the mass
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}
    # repetition penalty 2 on seen tokens 0 and 4: 3.0 -> 1.5 (positive: divided), -1 -> -2 (negative: multiplied)
    seen = torch.tensor([[0, 4, -1]])
    assert int(sample_next(logits, repetition_penalty=2.0, seen=seen)) == 1
    assert int(sample_next(torch.tensor([[1.6, 3.0, 0.0]]), repetition_penalty=2.0, seen=torch.tensor([[1]]))) == 0


@pytest.mark.parametrize("slot_embedding", [False, True])
def test_save_and_load_round_trip(tmp_path, slot_embedding):
    m = tiny_vlm(slot_embedding=slot_embedding)
    m.save_pretrained(tmp_path)
    again = VLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 7]])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(ids, pix)["logits"], m(ids, pix)["logits"])
    assert again.cfg == m.cfg


# ---- fast generation -----------------------------------------------------------------------------------------------

def chain_vlm(seed=3):
    """A tiny VLM whose greedy continuations vary and whose logits are far apart: the token embeddings are large
    (std 1, over the small layers' std 0.02 contributions) and the untied head maps token x to a fixed successor
    sigma(x), so every step's top-2 logit gap dwarfs bf16 rounding (by ~100x at this seed, measured below)."""
    m = tiny_vlm(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        E = torch.randn(48, 32, generator=g)
        m.lm.embed_tokens.weight.copy_(E)
        successor = E[torch.randperm(48, generator=g)]
        m.lm.lm_head = torch.nn.Linear(32, 48, bias=False)
        m.lm.lm_head.weight.copy_(successor / successor.norm(dim=1, keepdim=True) * 4)
    return m


PROMPTS = [[1, 2, IMG, IMG, IMG, IMG, 7], [1, 9, 10], [1, IMG, IMG, IMG, IMG, 9, 8, 9, 4, 11]]


def top2_gaps(m, prompts, pix, outs):
    """The smallest top-2 logit gap along each greedy continuation, by full forwards in fp32."""
    gaps, k = [], 0
    for p, out in zip(prompts, outs):
        n_img = p.count(IMG) // m.cfg.image_tokens
        logits = m(torch.tensor([p + out]), pix[k:k + n_img] if n_img else None)["logits"][0, len(p) - 1:]
        k += n_img
        logits[:, IMG] = float("-inf")
        top = logits.topk(2, -1).values
        gaps.append(float((top[:, 0] - top[:, 1]).min().detach()))
    return min(gaps)


@pytest.mark.parametrize("weights,autocast", [(torch.float32, True), (torch.bfloat16, False),
                                              (torch.bfloat16, True)])
def test_generate_under_autocast_and_bf16(monkeypatch, weights, autocast):
    """Issue 22 faults 1 and 2: under autocast with fp32 weights, k and v reach the KV cache in bf16 (it used to
    be fp32: 'Index put requires the source and destination dtypes match'), and q, k, v reach attention in one
    dtype (the rotation by fp32 tables used to leave q, k fp32 and v bf16, so flash-attn was never chosen).
    The greedy tokens equal the fp32 ones, on a model whose top-2 logit gaps are far above bf16 rounding."""
    m = chain_vlm()
    pix = torch.randn(2, 3, 32, 32)
    want = m.generate(PROMPTS, pix, max_new_tokens=8)
    assert top2_gaps(m, PROMPTS, pix, want) > 5.0                         # bf16 moves these logits by < 0.1
    assert len({t for row in want for t in row}) > 3                     # not one token repeated
    import nanovlm.qwen2 as qwen2
    seen, plain = [], qwen2.attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, None if kw["cache"] is None else kw["cache"].dtype))
        return plain(q, k, v, **kw)
    monkeypatch.setattr(qwen2, "attention", spy)
    m = m.to(weights)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = m.generate(PROMPTS, pix.to(weights), max_new_tokens=8)
    assert got == want
    assert set(seen) == {(torch.bfloat16,) * 4}     # q, k, v and the cache: one dtype at every call


def test_prompts_run_once_for_many_samples():
    """num_samples=4 prefills each prompt (and its image) once and copies its cache: greedy, every copy equals
    decoding the prompt repeated 4 times, and sampled (hot, so the 4 differ) it draws the same tokens."""
    m = chain_vlm()
    pix = torch.randn(2, 3, 32, 32)
    shared = m.generate(PROMPTS, pix, max_new_tokens=6, num_samples=4)
    rows = [p for p in PROMPTS for _ in range(4)]
    pix_rows = torch.cat([pix[:1]] * 4 + [pix[1:]] * 4)
    assert shared == m.generate(rows, pix_rows, max_new_tokens=6)
    assert shared[0::4] == [greedy_by_full_forward(m, p, x, 6) for p, x in zip(PROMPTS, [pix[:1], None, pix[1:]])]
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a = m.generate(PROMPTS, pix, max_new_tokens=6, temperature=20.0, generator=g1, num_samples=4)
    b = m.generate(rows, pix_rows, max_new_tokens=6, temperature=20.0, generator=g2)
    assert a == b and len({tuple(r) for r in a}) > 3


def test_per_row_stops_and_include_stop():
    """Row 0 stops at once (its prompt makes the stop token the argmax), the others run on: per-row stops, with
    the stop token returned only with include_stop, and streaming never sends it."""
    m = chain_vlm()
    pix = torch.randn(2, 3, 32, 32)
    free = m.generate(PROMPTS, pix, max_new_tokens=5)
    stop = free[1][2]                              # a token row 1 emits third: make it the stop token
    m.cfg.stop_token_ids = (stop,)
    out = m.generate(PROMPTS, pix, max_new_tokens=5)
    assert out[1] == free[1][:2]
    for row, f in zip(out, free):
        assert row == (f[:f.index(stop)] if stop in f else f)
    with_stop = m.generate(PROMPTS, pix, max_new_tokens=5, include_stop=True)
    assert with_stop[1] == free[1][:3]
    streamed = {0: [], 1: [], 2: []}
    m.generate(PROMPTS, pix, max_new_tokens=5, on_token=lambda b, t: streamed[b].append(t))
    assert [streamed[b] for b in range(3)] == out


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """torch.compile captures the decode step whole (fullgraph=True: no graph break) and decodes the same greedy
    tokens. On the CPU this compiles for tens of seconds; on CUDA the same call replays CUDA graphs."""
    m = chain_vlm()
    pix = torch.randn(2, 3, 32, 32)
    want = m.generate(PROMPTS, pix, max_new_tokens=6)
    assert m.generate(PROMPTS, pix, max_new_tokens=6, compile=True) == want


@cuda
@pytest.mark.gpu
def test_compiled_decode_step_with_cuda_graphs_on_gpu():
    """On CUDA, compile=True replays the decode step as CUDA graphs (the cache written in place): the same greedy
    tokens as eager, twice in a row (the second call re-records for the new cache), under bf16 autocast."""
    m = chain_vlm().cuda()
    pix = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = m.generate(PROMPTS, pix, max_new_tokens=6)
        assert m.generate(PROMPTS, pix, max_new_tokens=6, compile=True) == want
        assert m.generate(PROMPTS, pix, max_new_tokens=6, compile=True, num_samples=2) == \
            [row for row in want for _ in range(2)]
