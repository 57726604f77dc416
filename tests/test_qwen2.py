"""Our Qwen2 against transformers' Qwen2ForCausalLM on checkpoints in the official format."""
import json

import pytest
import torch
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM

from conftest import cuda, randomize
from nanovlm.attention import KVCache
from nanovlm.qwen2 import Qwen2

LAYOUTS = {  # name: (heads, kv heads, hidden, tied)
    "gqa-tied": (4, 2, 64, True),
    "mha-untied": (4, 4, 64, False),
    "gqa6to1-untied": (6, 1, 48, False),
    "gqa8to2-tied": (8, 2, 128, True),
}


def make_reference(tmp_path, layout="gqa-tied", shard=None, seed=0, dtype=torch.float32):
    heads, kv, hidden, tied = LAYOUTS[layout]
    cfg = HFConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=2,
                   num_attention_heads=heads, num_key_value_heads=kv, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(seed)
    ref = randomize(Qwen2ForCausalLM(cfg), std=0.1, seed=seed).eval()
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if dtype != torch.float32:  # build in the dtype, as a user does: keeps transformers' inv_freq in fp32
        ref = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="eager").eval()
    return ref


def ids(B=2, T=11, seed=0):
    return torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_fp32_parity(tmp_path, layout, backend):
    ref = make_reference(tmp_path, layout)
    ours = Qwen2.from_pretrained(tmp_path, attn_backend=backend)
    x = ids()
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max() <= 1e-5


def test_sharded_checkpoint(tmp_path):
    ref = make_reference(tmp_path, "mha-untied", shard="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    x = ids()
    with torch.no_grad():
        assert (Qwen2.from_pretrained(tmp_path)(x) - ref(x).logits).abs().max() <= 1e-5


def test_transformers_4x_config_format(tmp_path):
    """4.x wrote rope_theta and torch_dtype at the top level instead of rope_parameters / dtype."""
    ref = make_reference(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("dtype", None)
    cfg.update(rope_theta=theta, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    x = ids()
    with torch.no_grad():
        assert (Qwen2.from_pretrained(tmp_path)(x) - ref(x).logits).abs().max() <= 1e-5


def test_bf16_parity(tmp_path):
    ref = make_reference(tmp_path, "gqa8to2-tied", dtype=torch.bfloat16)
    ours = Qwen2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    x = ids()
    with torch.no_grad():
        a, b = ours(x).float(), ref(x).logits.float()
    scale = b.abs().max()
    assert (a - b).abs().max() / scale < 2e-2   # bf16 has 8 bits of mantissa
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_left_padded_batch_matches_transformers(tmp_path):
    ref = make_reference(tmp_path, "gqa-tied")
    ours = Qwen2.from_pretrained(tmp_path)
    x = ids(B=3, T=8)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :5] = 0
    with torch.no_grad():
        a = ours(x, attention_mask=mask)
        b = ref(x, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_row_matches_transformers_on_each_sample(tmp_path, backend):
    """Samples of 5, 4 and 2 tokens packed into one row (attention_mask 1 1 1 1 1 2 2 2 2 3 3 0): each one's
    logits equal transformers' on that sample alone, so positions restart and nothing leaks across."""
    ref = make_reference(tmp_path, "gqa-tied")
    ours = Qwen2.from_pretrained(tmp_path, attn_backend=backend)
    samples = [ids(1, n, seed=i)[0] for i, n in enumerate([5, 4, 2])]
    x = torch.cat(samples + [torch.zeros(1, dtype=torch.long)])[None]              # (1, 12)
    seg = torch.tensor([[1] * 5 + [2] * 4 + [3] * 2 + [0]])
    with torch.no_grad():
        a = ours(x, attention_mask=seg)[0]
        t = 0
        for s in samples:
            b = ref(s[None]).logits[0]
            assert (a[t:t + len(s)] - b).abs().max() <= 1e-5
            t += len(s)
        with pytest.raises(ValueError, match="one per row"):
            ours(x, attention_mask=seg, cache=KVCache(2, 1, 20, 2, 16))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_decoding_matches_full_forward(tmp_path, backend):
    """Right-padded prompts of lengths 7, 3, 5 decode together; every step's logits equal a full forward
    of that row's unpadded sequence, and greedy tokens equal transformers' generate."""
    ref = make_reference(tmp_path, "gqa-tied")
    ours = Qwen2.from_pretrained(tmp_path, attn_backend=backend)
    lens, steps = [7, 3, 5], 6
    prompts = [ids(1, n, seed=i)[0] for i, n in enumerate(lens)]
    x = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, :len(p)], mask[b, :len(p)] = p, True
    cache = KVCache(2, 3, 7 + steps, 2, 16)
    seqs = [p.tolist() for p in prompts]
    with torch.no_grad():
        logits = ours(x, attention_mask=mask, cache=cache)
        last = logits[torch.arange(3), torch.tensor(lens) - 1]          # (B, V)
        for s in range(steps):
            for b in range(3):
                full = ours(torch.tensor([seqs[b]]))[0, -1]
                assert (last[b] - full).abs().max() <= 1e-5
            nxt = last.argmax(-1)
            for b in range(3):
                seqs[b].append(int(nxt[b]))
            last = ours(nxt[:, None], cache=cache)[:, 0]
        for b in range(3):
            hf = ref.generate(prompts[b][None], max_new_tokens=steps, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            assert hf[0].tolist() == seqs[b]


def test_round_trip_through_transformers(tmp_path):
    ref = make_reference(tmp_path / "ref", "gqa6to1-untied")
    ours = Qwen2.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max() <= 1e-5


def test_round_trip_tied_sharded(tmp_path):
    make_reference(tmp_path / "ref", "gqa-tied")
    ours = Qwen2.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=30_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    again = Qwen2.from_pretrained(tmp_path / "ours")
    x = ids()
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max() <= 1e-5
        assert (again(x) - ours(x)).abs().max() == 0


def test_training_from_scratch_gets_gradients():
    from nanovlm.qwen2 import Qwen2Config
    model = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2))
    x = torch.randint(0, 50, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@cuda
@pytest.mark.gpu
def test_bf16_parity_on_gpu(tmp_path):
    ref = make_reference(tmp_path, "gqa8to2-tied", dtype=torch.bfloat16).cuda()
    ours = Qwen2.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    x = ids().cuda()
    with torch.no_grad():
        a, b = ours(x).float(), ref(x).logits.float()
    assert (a - b).abs().max() / b.abs().max() < 2e-2
