"""Training utilities: schedule closed form, data order, optimizer groups, atomic checkpoints, exact resume."""

import json
import math
import os

import numpy as np
import pytest
import torch

from nanovlm import train_utils as tu
from nanovlm.flops import flops_per_token, mfu, peak_flops, peak_flops_of
from nanovlm.gpt import GPT, GPTConfig


def test_lr_schedule_closed_form():
    base, warm, total, r = 1.0, 10, 110, 0.1
    assert tu.lr_at(0, total, base, warm, r) == pytest.approx(0.1)       # (0 + 1) / 10
    assert tu.lr_at(4, total, base, warm, r) == pytest.approx(0.5)
    assert tu.lr_at(10, total, base, warm, r) == pytest.approx(1.0)      # cosine starts at the peak
    assert tu.lr_at(60, total, base, warm, r) == pytest.approx(0.55)     # halfway: 0.1 + 0.5 * 0.9
    assert tu.lr_at(35, total, base, warm, r) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert tu.lr_at(110, total, base, warm, r) == pytest.approx(0.1)
    assert tu.lr_at(500, total, base, warm, r) == pytest.approx(0.1)     # stays at the floor


def test_batch_indices_epochs_and_ddp_equals_accumulation():
    n, seed = 10, 7
    # 1 process, batch 4: steps 0..4 read 20 samples = two full permutations of range(10)
    stream = [i for s in range(5) for i in tu.batch_indices(s, 0, 0, 1, 4, 1, n, seed)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each epoch
    for step in range(4):
        ddp = [tu.batch_indices(step, 0, r, 2, 3, 1, n, seed) for r in range(2)]     # 2 ranks x 1 micro
        acc = [tu.batch_indices(step, m, 0, 1, 3, 2, n, seed) for m in range(2)]     # 1 rank x 2 micro
        assert ddp == acc


def test_batch_indices_grouped_by_length():
    # Half the samples are short (20 tokens), half long (90), interleaved. Grouped, a batch of 4 holds one kind
    # only (one window covers the epoch: 24 samples < GROUP_WINDOW batches), so it pads nothing.
    n, seed = 24, 3
    lengths = tuple(20 if i % 2 else 90 for i in range(n))
    for epoch in range(2):
        stream = [i for s in range(6 * epoch, 6 * epoch + 6) for i in tu.batch_indices(s, 0, 0, 1, 4, 1, n, seed,
                                                                                         lengths)]
        assert sorted(stream) == list(range(n))                       # still every sample once per epoch
        batches = [{lengths[i] for i in stream[k:k + 4]} for k in range(0, n, 4)]
        assert all(len(b) == 1 for b in batches) and batches.count({20}) == 3
    plain = [{lengths[i] for i in tu.batch_indices(s, 0, 0, 1, 4, 1, n, seed)} for s in range(6)]
    assert any(len(b) == 2 for b in plain)                            # ungrouped batches mix them
    for step in range(4):                                             # DDP == accumulation holds grouped too
        ddp = [tu.batch_indices(step, 0, r, 2, 3, 1, n, seed, lengths) for r in range(2)]
        acc = [tu.batch_indices(step, m, 0, 1, 3, 2, n, seed, lengths) for m in range(2)]
        assert ddp == acc


def test_optimizer_groups_decay_and_freezing():
    emb, lin = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4)
    frozen = torch.nn.Linear(4, 4)
    opt = tu.make_optimizer([("emb", emb.parameters(), 1e-3), ("lin", lin.parameters(), 2e-3),
                             ("frozen", frozen.parameters(), 0.0)], weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"emb", "lin", "lin_no_decay"}
    assert groups["lin"]["params"] == [lin.weight] and groups["lin_no_decay"]["params"] == [lin.bias]
    assert groups["lin"]["weight_decay"] == 0.1 and groups["lin_no_decay"]["weight_decay"] == 0.0
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    tu.set_lr(opt, 0, 100, warmup_steps=4)  # every group scaled from its own base lr
    assert groups["emb"]["lr"] == pytest.approx(2.5e-4) and groups["lin"]["lr"] == pytest.approx(5e-4)


def test_check_finite_names_the_step():
    assert tu.check_finite(torch.tensor(1.5), 3) == 1.5
    with pytest.raises(FloatingPointError, match="step 42"):
        tu.check_finite(torch.tensor(float("nan")), 42)


def _tiny():
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.2))


def _train(model, opt, steps, data, seed=0):
    for step in steps:
        tu.set_lr(opt, step, 6, warmup_steps=2)
        x = data[tu.batch_indices(step, 0, 0, 1, 4, 1, len(data), seed)]
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_is_exact(tmp_path):
    data = torch.randint(0, 20, (10, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = _tiny()
    opt = tu.make_optimizer([("m", ref.parameters(), 1e-2)])
    _train(ref, opt, range(6), data)

    torch.manual_seed(0)
    model = _tiny()
    opt = tu.make_optimizer([("m", model.parameters(), 1e-2)])
    _train(model, opt, range(3), data)
    tu.save_checkpoint(tmp_path / "ck", model, {"model_type": "gpt"}, optimizer=opt, step=3)
    torch.manual_seed(123)  # a fresh process: other weights, other RNG state
    model2 = _tiny()
    opt2 = tu.make_optimizer([("m", model2.parameters(), 1e-2)])
    state = tu.load_checkpoint(tmp_path / "ck", model2, opt2)
    assert state["step"] == 3
    _train(model2, opt2, range(3, 6), data)
    for (k, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k  # dropout masks and Adam moments continued exactly


def test_checkpoint_swap_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last"
    m = torch.nn.Linear(2, 2)
    tu.save_checkpoint(path, m, {"model_type": "gpt", "step": 1}, files={"vocab.json": "{}"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert tu.read_config(path)["step"] == 1

    # A crash while writing the new one leaves the old checkpoint intact.
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(tu, "save_model", boom)
    with pytest.raises(RuntimeError):
        tu.save_checkpoint(path, m, {"model_type": "gpt", "step": 2})
    assert tu.read_config(path)["step"] == 1
    monkeypatch.undo()

    # A crash between the two renames: the old one was moved aside; the new one, complete beside it, is found.
    real_rename, calls = os.rename, []
    def rename_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        real_rename(src, dst)
    monkeypatch.setattr(tu.os, "rename", rename_then_crash)
    with pytest.raises(RuntimeError):
        tu.save_checkpoint(path, m, {"model_type": "gpt", "step": 3})
    monkeypatch.undo()
    assert not path.exists() and tu.read_config(path)["step"] == 3

    tu.save_checkpoint(path, m, {"model_type": "gpt", "step": 4})  # the next save cleans up
    assert tu.read_config(path)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_metrics_logger_jsonl_plot_and_resume(tmp_path):
    log = tu.MetricsLogger(tmp_path)
    for s in (1, 2, 3):
        log.log(s, loss=1.0 / s)
    log.plot(["loss"], "loss.png")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3}]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    tu.MetricsLogger(tmp_path, resume_step=2)  # lines after the resumed step are from a lost run
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_throughput_formulas():
    assert flops_per_token(1000, 2, 8, 4) == 6 * 1000 + 12 * 2 * 8 * 4
    assert mfu(1e12, "cpu") is None and peak_flops("cpu") is None


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA A10G", None), ("Tesla T4", None)])
def test_peak_table_matches_the_right_device(name, peak):
    """The most specific name wins ("L40" is not an "L4", "H100 PCIe" not an SXM H100); unknown: no MFU."""
    assert peak_flops_of(name) == peak


def test_train_flops_by_hand():
    """flops.train_flops against a hand count on a tiny VLM: one packed row of two samples (3 and 5 tokens),
    one 8x8 image of 4 patches (1 image token after the 2x2 shuffle), 2 labelled positions."""
    from nanovlm.projector import ProjectorConfig
    from nanovlm.qwen2 import Qwen2Config
    from nanovlm.siglip import SiglipConfig
    from nanovlm.vlm import VLM, VLMConfig
    from nanovlm.flops import train_flops
    cfg = VLMConfig(lm=Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
                    vision=SiglipConfig(image_size=8, patch_size=4, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2),
                    projector=ProjectorConfig(shuffle_factor=2), image_token_id=5)
    model = VLM(cfg)
    labels = torch.full((1, 8), -100)
    labels[0, 2], labels[0, 7] = 4, 4
    batch = dict(attention_mask=torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2]]), labels=labels,
                 pixel_values=torch.zeros(1, 3, 8, 8))
    # Forward FLOPs, 2 per multiply-add. Vision, 4 patches: conv 3*4*4*8 weights, q/k/v/out 8x8, fc1/fc2 8x16;
    # attention 4^2 pairs x 8 channels x 2 products. Projector, 1 token: fc1 32x8, fc2 8x8.
    # LM, 8 real tokens: q 8x8, k/v 8x4, o 8x8, gate/up/down 8x16; attention 3*4/2 + 5*6/2 = 21 causal pairs x
    # (2 heads x 4) channels x 2 products; the tied head 8x32 at the 2 labelled positions.
    conv, vqkv, vattn, vout, vmlp = 2 * 384 * 4, 3 * 2 * 64 * 4, 2 * 2 * 16 * 8, 2 * 64 * 4, 2 * 2 * 128 * 4
    pfc1, pfc2 = 2 * 256, 2 * 64
    q, kv, lattn, o, mlp, head = 2 * 64 * 8, 2 * 2 * 32 * 8, 2 * 2 * 21 * 8, 2 * 64 * 8, 3 * 2 * 128 * 8, 2 * 256 * 2
    vision_linear, lm_linear = vqkv + vout + vmlp, q + kv + o + mlp
    # Everything trains: every layer 3x its forward (input and weight gradients), except the first, the patch
    # convolution, which has nothing before it to pass a gradient to (2x); attention cores 3x.
    assert train_flops(model, batch) == (2 * conv + 3 * vision_linear + 3 * vattn + 3 * (pfc1 + pfc2)
                                         + 3 * lm_linear + 3 * lattn + 3 * head)
    # The vision tower frozen: it runs forward only; the projector's fc1 gets a weight gradient but passes none
    # back (2x); everything after it 3x.
    model.vision.requires_grad_(False)
    assert train_flops(model, batch) == (conv + vision_linear + vattn + 2 * pfc1 + 3 * pfc2
                                         + 3 * lm_linear + 3 * lattn + 3 * head)
    # Only the projector trains (stage 1): the frozen LM still passes the gradient back to it (2x; attention 3x).
    model.lm.requires_grad_(False)
    assert train_flops(model, batch) == (conv + vision_linear + vattn + 2 * pfc1 + 3 * pfc2
                                         + 2 * lm_linear + 3 * lattn + 2 * head)
    # A text-only batch: the training projector still sees a blank image (VLM.embed), so the same count.
    text = dict(batch, pixel_values=torch.zeros(0, 3, 8, 8))
    assert train_flops(model, text) == train_flops(model, batch)
    # Nothing before the frozen LM trains either: no image runs, and the LM runs forward only.
    model.projector.requires_grad_(False)
    assert train_flops(model, text) == lm_linear + lattn + head


def test_train_flops_qwen_vl_by_hand():
    """train_flops on a tiny Qwen2.5-VL against a hand count: one 84x56 image (6x4 patches of 14, 3x2 LM tokens
    after the 2x2 merge) in a sample of 10 tokens, 2 labelled positions. Windows of 56 pixels = 2x2 LM tokens =
    4x4 patches: the image's 3 token rows split 2 + 1, so its windows hold 16 and 8 patches; block 0 attends in
    windows, block 1 (full attention) over the whole image's 24 patches."""
    from nanovlm.qwen2 import Qwen2Config
    from nanovlm.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionConfig
    from nanovlm.flops import train_flops
    cfg = Qwen25VLConfig(lm=Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
                         vision=VisionConfig(depth=2, hidden_size=8, intermediate_size=12, num_heads=2,
                                             out_hidden_size=16, window_size=56, fullatt_block_indexes=(1,)),
                         mrope_section=(2, 1, 1), image_token_id=5)
    model = Qwen25VL(cfg)
    labels = torch.full((1, 10), -100)
    labels[0, 8], labels[0, 9] = 4, 4
    batch = dict(attention_mask=torch.ones(1, 10, dtype=torch.long), labels=labels,
                 pixel_values=torch.zeros(24, 1176), image_grid_thw=torch.tensor([[1, 6, 4]]))
    # Forward FLOPs, 2 per multiply-add. Vision, 24 patches: the patch embedding 1176 -> 8; per block qkv 8x24,
    # proj 8x8, gate/up/down 8x12; attention (16^2 + 8^2) window pairs in block 0, 24^2 pairs in block 1, x 8
    # channels x 2 products. Merger, 6 tokens: fc1 32x32, fc2 32x16. LM, 10 tokens: q 16x16, k/v 16x8, o 16x16,
    # gate/up/down 16x32; 55 causal pairs x 16 channels x 2 products; the tied head 16x32 at 2 positions.
    conv = 2 * 1176 * 8 * 24
    vision_linear = 2 * 2 * (8 * 24 + 8 * 8 + 3 * 8 * 12) * 24
    window_attn, full_attn = 2 * 2 * (16 ** 2 + 8 ** 2) * 8, 2 * 2 * 24 ** 2 * 8
    fc1, fc2 = 2 * 32 * 32 * 6, 2 * 32 * 16 * 6
    lm_linear = 2 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32) * 10
    lattn, head = 2 * 2 * 55 * 16, 2 * 16 * 32 * 2
    assert train_flops(model, batch) == (2 * conv + 3 * vision_linear + 3 * (window_attn + full_attn)
                                         + 3 * (fc1 + fc2) + 3 * (lm_linear + lattn + head))
    # The ViT frozen (--lr-vision 0): the tower runs forward only, the merger's fc1 passes no gradient back.
    model.vision.requires_grad_(False)
    assert train_flops(model, batch) == (conv + vision_linear + window_attn + full_attn + 2 * fc1 + 3 * fc2
                                         + 3 * (lm_linear + lattn + head))
    # A text-only batch: the training merger sees a blank image of 2x2 patches (Qwen25VL.embed), one window.
    text = dict(batch, pixel_values=torch.zeros(0, 1176), image_grid_thw=torch.zeros(0, 3, dtype=torch.long))
    blank = 4 / 24
    assert train_flops(model, text) == (conv * blank + vision_linear * blank + 2 * (2 * 2 * 4 ** 2 * 8)
                                        + (2 * fc1 + 3 * fc2) / 6 + 3 * (lm_linear + lattn + head))
    model.projector.requires_grad_(False)
    assert train_flops(model, text) == 3 * (lm_linear + lattn + head)


class FakeWandb:
    """Records what a wandb run is given (the real package may be absent, and is never needed for this)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, row, step):
        self.logged.append((step, row))

    def finish(self):
        self.finished += 1


def test_wandb_logs_what_metrics_jsonl_logs(tmp_path, monkeypatch):
    import sys
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = tu.MetricsLogger(tmp_path, wandb_project="nanovlm", config={"lr": 1e-3})
    log.log(0, loss=2.0, lr=1e-3)
    log.log(10, val_loss=1.5)
    log.finish()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows] == fake.logged
    assert fake.inits[0]["project"] == "nanovlm" and fake.inits[0]["config"] == {"lr": 1e-3} and fake.finished == 1
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert fake.inits[0]["id"] == run_id
    tu.MetricsLogger(tmp_path, is_main=False, wandb_project="nanovlm").log(20, loss=1.0)   # other ranks: nothing
    assert len(fake.inits) == 1 and len(fake.logged) == 2
    tu.MetricsLogger(tmp_path, resume_step=10, wandb_project="nanovlm")   # --resume continues the same run
    assert fake.inits[-1]["id"] == run_id
    tu.MetricsLogger(tmp_path, wandb_project="nanovlm")                   # a new run: a new id
    assert fake.inits[-1]["id"] != run_id


def test_wandb_is_not_imported_without_the_flag(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from nanovlm import train_utils as tu; log = tu.MetricsLogger(sys.argv[1]); "
            "log.log(0, loss=1.0); log.finish(); assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


@pytest.mark.slow
def test_wandb_offline_run(tmp_path, monkeypatch):
    """The real package, offline (skipped when wandb is not installed): the run's record file is written, with
    the logged values in it (the file is wandb's protobuf log; its history items carry keys and JSON values)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = tu.MetricsLogger(tmp_path, wandb_project="nanovlm-test")
    log.log(0, loss=2.0)
    log.log(10, loss=0.125)
    log.finish()
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    assert b"loss" in data and b"0.125" in data


def test_token_batches_fill_a_budget_and_cover_each_epoch():
    """--batch-tokens: micro-batches of at most `budget` tokens, each sample once per epoch, and the same pure
    function of (step, micro-step, rank) as batch_indices: 2 ranks read what 1 rank reads in 2 micro-steps."""
    rng = np.random.default_rng(0)
    lengths = tuple(int(x) for x in rng.integers(5, 60, size=50))
    budget = 100
    one = [tu.token_batch_indices(step, m, 0, 1, 2, lengths, 7, budget) for step in range(12) for m in range(2)]
    two = [tu.token_batch_indices(step, 0, r, 2, 1, lengths, 7, budget) for step in range(12) for r in range(2)]
    assert one == two
    assert all(sum(lengths[i] for i in b) <= budget for b in one)
    # greedy: the next sample of the epoch's order would not have fit
    first_epoch = tu._token_batches(lengths, 7, 0, budget)
    assert sorted(i for b in first_epoch for i in b) == list(range(50))
    for b, nxt in zip(first_epoch, first_epoch[1:]):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > budget
    # the stream runs on into the next epochs
    assert one[len(first_epoch)] == tu._token_batches(lengths, 7, 1, budget)[0]
    with pytest.raises(ValueError, match="does not fit --batch-tokens 30"):
        tu.token_batch_indices(0, 0, 0, 1, 1, lengths, 7, 30)
