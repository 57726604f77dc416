"""The small GPT and its codebook data: hand-worked examples and closed forms, CPU only."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanovlm import codebook
from nanovlm.gpt import GPT, GPTConfig
from nanovlm.sampling import sample_next

ROOT = Path(__file__).resolve().parents[1]


def test_vocab_ids_are_fixed():
    v = codebook.build_vocab(512)
    expected = {"<PAD>": 0, "<IMG>": 1, "</IMG>": 2, "<CLS>": 3, "<EOS>": 4, "<CLS_0>": 5, "<CLS_9>": 14,
                "c_0": 15, "c_511": 526}
    assert {t: v[t] for t in expected} == expected
    assert len(v) == 527 and sorted(v.values()) == list(range(527))
    assert codebook.build_vocab(512) == v  # same across calls / runs
    assert codebook.class_token_ids(v) == list(range(5, 15))


def test_truncation_keeps_tail_and_padding_is_minus_100():
    # <IMG> c_0 c_1 c_2 c_3 </IMG> <CLS> <CLS_3> <EOS> with c_i = 15 + i, <CLS_3> = 8
    seq = [1, 15, 16, 17, 18, 2, 3, 8, 4]
    assert codebook.truncate(seq, 6) == [1, 15, 2, 3, 8, 4]
    assert codebook.truncate(seq, 5) == [1, 2, 3, 8, 4]
    assert codebook.truncate(seq, 100) == seq
    with pytest.raises(ValueError):
        codebook.truncate(seq, 4)
    short = [1, 20, 2, 3, 5, 4]  # one code, label 0
    x, y = codebook.collate([seq, short], max_length=7)
    # seq truncated to [1, 15, 16, 2, 3, 8, 4]; inputs drop the last token, targets the first
    assert x.tolist() == [[1, 15, 16, 2, 3, 8], [1, 20, 2, 3, 5, 0]]
    assert y.tolist() == [[15, 16, 2, 3, 8, 4], [20, 2, 3, 5, 4, -100]]


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    v = codebook.build_vocab(4)
    f = tmp_path / "d.jsonl"
    f.write_text('{"tokens": "<IMG> c_1 </IMG> <CLS> <CLS_2> <EOS>"}\n'
                 '{"tokens": "<IMG> c_9 </IMG> <CLS> <CLS_2> <EOS>"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: unknown token 'c_9'"):
        codebook.read_jsonl(f, v)
    f.write_text('{"tokens": "<IMG> c_1 </IMG> <CLS> <CLS_2> <EOS>"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        codebook.read_jsonl(f, v)


def test_vocab_with_a_shared_id_is_refused(tmp_path):
    v = codebook.build_vocab(4)
    v["c_2"] = v["<CLS_3>"]  # a code and a label on one embedding row
    f = tmp_path / "vocab.json"
    f.write_text(json.dumps(v))
    with pytest.raises(ValueError, match=r"vocab\.json: tokens '<CLS_3>', 'c_2' share id 8"):
        codebook.load_vocab(f)
    v = codebook.build_vocab(4)
    v["c_3"] = 40  # a gap: id 18 unused, 40 past the embedding
    f.write_text(json.dumps(v))
    with pytest.raises(ValueError, match=r"vocab\.json: ids must be 0\.\.18"):
        codebook.load_vocab(f)


ONLY_CODES = "between <IMG> and </IMG> only image codes may appear, got"


@pytest.mark.parametrize("line, message", [
    ("<IMG> c_1 </IMG> <CLS> c_2 <EOS>", "the token before <EOS> must be a label <CLS_k>, got 'c_2'"),
    ("<IMG> c_1 <CLS_1> </IMG> <CLS> <CLS_2> <EOS>", f"{ONLY_CODES} '<CLS_1>'"),
    ("<IMG> <CLS> c_1 </IMG> <CLS> <CLS_2> <EOS>", f"{ONLY_CODES} '<CLS>'"),
])
def test_data_with_a_wrong_label_slot_is_refused(tmp_path, line, message):
    v = codebook.build_vocab(4)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"tokens": "<IMG> c_1 </IMG> <CLS> <CLS_2> <EOS>"}) + "\n" + json.dumps({"tokens": line}))
    with pytest.raises(ValueError, match=re.escape(f"d.jsonl:2: {message}")):
        codebook.read_jsonl(f, v)


def test_patches_and_quantisation_by_hand():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    p = codebook.extract_patches(img, patch=2, stride=2)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5] and p[0, 3].tolist() == [10, 11, 14, 15]
    assert codebook.extract_patches(img, 2, 1).shape == (1, 9, 4)
    centres = np.array([[0, 0], [10, 10]], dtype=np.float32)
    pts = np.array([[[1, 1], [9, 8], [4, 4], [6, 6]]], dtype=np.float32)
    assert codebook.quantize(pts, centres).tolist() == [[0, 1, 0, 1]]


def test_kmeans_deterministic_and_finds_cluster_means():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    a, b = codebook.kmeans(x, 2, seed=3), codebook.kmeans(x, 2, seed=3)
    assert np.array_equal(a, b)
    got = sorted(map(tuple, a.round(4)))
    want = sorted(map(tuple, np.stack([x[:50].mean(0), x[50:].mean(0)]).astype(np.float32).round(4)))
    assert got == want
    # fewer distinct points than codes must not crash
    assert codebook.kmeans(np.zeros((10, 3)), 4, seed=0).shape == (4, 3)


def test_class_metric_is_restricted_to_label_tokens():
    v = codebook.build_vocab(4)  # V = 19, labels 5..14
    x = torch.tensor([[1, 15, 2, 3], [1, 2, 3, 0]])
    y = torch.tensor([[15, 2, 3, 7], [2, 3, 9, -100]])  # true classes 2 (<CLS_2> = 7) and 4 (<CLS_4> = 9)
    logits = torch.zeros(2, 4, 19)
    logits[0, 3, 16] = 10.0   # a code beats every label at <CLS>: must be ignored
    logits[0, 3, 7] = 2.0     # best label token -> class 2 (right)
    logits[1, 2, 4] = 9.0     # <EOS> ignored
    logits[1, 2, 6] = 1.0     # class 1 (wrong; true class 4)
    logits[1, 3, 9] = 50.0    # a padded position, not <CLS>: ignored
    pred, true = codebook.class_predictions(logits, x, y, codebook.class_token_ids(v))
    assert pred.tolist() == [2, 1] and true.tolist() == [2, 4]


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits[:3], temperature=0).tolist() == [0, 0, 0]
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus 0.6: 0.5 alone is short of 0.6, so {0, 1}; 0.5 exactly -> {0}
    assert set(sample_next(logits, 1.0, top_p=0.6, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    # within {0, 1} the renormalised probabilities are 5/8 and 3/8
    s = sample_next(logits, 1.0, top_k=2, generator=g)
    assert abs((s == 0).float().mean().item() - 0.625) < 0.04


def test_initial_loss_is_log_vocab_and_cached_greedy_matches_full_forward():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg).eval()
    x = torch.randint(0, 50, (4, 12))
    _, loss = model(x, torch.randint(0, 50, (4, 12)))  # targets unrelated to the inputs
    assert abs(loss.item() - math.log(50)) < 0.1  # small init -> near-uniform predictions
    # Rows of different lengths, right-padded; reference: recompute the whole sequence at each step.
    lengths = torch.tensor([5, 3, 8, 1])
    prompt = torch.where(torch.arange(8)[None] < lengths[:, None], torch.randint(1, 50, (4, 8)), 0)
    new = model.generate(prompt, 6, temperature=0, lengths=lengths)
    for b in range(4):
        seq = prompt[b, :lengths[b]].tolist()
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        assert new[b].tolist() == seq[int(lengths[b]):]


def test_short_training_lowers_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 30, (8, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _tiny_data(d):
    d.mkdir()
    vocab = codebook.build_vocab(8)
    (d / "vocab.json").write_text(json.dumps(vocab))
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                k = int(rng.integers(3))
                codes = (rng.integers(0, 4, 5) + 4 * (k % 2)).tolist()
                f.write(json.dumps({"tokens": codebook.sequence_text(codes, k)}) + "\n")


def _train_gpt():
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "train_gpt.py")
    train_gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_gpt)
    return train_gpt


TINY = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd",
        "16", "--warmup-steps", "1", "--device", "cpu", "--no-baseline"]


def test_train_then_sample_gpt_evaluates_samples_and_exports(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import sample
    import sample_gpt
    _tiny_data(tmp_path / "data")
    out = tmp_path / "out"
    _train_gpt().main(["--data", str(tmp_path / "data"), "--out-dir", str(out)] + TINY)
    model = GPT.from_checkpoint(out / "last").eval()
    # the copy for transformers, written at the end of training, is the final model
    hf = transformers.GPT2LMHeadModel.from_pretrained(out / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    vocab = codebook.load_vocab(out / "last" / "vocab.json")
    lines = (tmp_path / "data" / "val.jsonl").read_text().splitlines()
    texts = [json.loads(line)["tokens"] for line in lines]
    x = torch.tensor([tok(t)["input_ids"] for t in texts])                    # all of one length here
    assert x.tolist() == [codebook.encode(t, vocab) for t in texts]
    with torch.no_grad():
        logits = model(x)[0]
        assert (logits - hf(x).logits).abs().max() <= 1e-5
    # --eval: accuracy at <CLS> (position -3 predicts <CLS_k> at -2), worked out here from the logits
    labels = [vocab[f"<CLS_{k}>"] for k in range(10)]
    right = sum(labels[int(logits[b, -3, labels].argmax())] == int(x[b, -2]) for b in range(len(x)))
    capsys.readouterr()
    sample_gpt.main(["--ckpt", str(out / "last"), "--eval", str(tmp_path / "data" / "val.jsonl"), "--device", "cpu"])
    assert f"({right}/{len(x)})" in capsys.readouterr().out
    # --tokens: greedy continuation of a sample's prompt, up to <EOS>
    sample_gpt.main(["--ckpt", str(out / "last"), "--tokens", " ".join(texts[0].split()[:-2]), "--device", "cpu"])
    said = capsys.readouterr().out.split()
    itos = {i: t for t, i in vocab.items()}
    assert said[0] == itos[int(logits[0, -3].argmax())] and len(said) <= 3
    # sample.py serves the VLM and says where GPT sampling lives
    with pytest.raises(SystemExit, match="sample_gpt.py"):
        sample.main(["--ckpt", str(out / "last"), "--device", "cpu"])


def test_init_from_a_checkpoint_that_is_not_a_gpt_is_one_line(tmp_path):
    """Run as a user runs it: one stderr line naming the directory and what it holds, exit code 2."""
    _tiny_data(tmp_path / "data")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text(json.dumps({"model_type": "vlm", "lm": {}}))
    env = {**os.environ, "NANOVLM_DEBUG": "", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--data", str(tmp_path / "data"), "--out-dir",
                        str(tmp_path / "out"), "--init-from", str(tmp_path / "sft")] + TINY,
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == f"error: {tmp_path / 'sft'} holds a 'vlm' checkpoint (config.json model_type), not a GPT " \
                       "written by train_gpt.py"


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path):
    _tiny_data(tmp_path / "data")
    common = ["--data", str(tmp_path / "data"), "--max-steps", "3", "--eval-every", "3", "--batch-size", "4",
              "--micro-batch", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--dropout", "0",
              "--warmup-steps", "1", "--lr", "1e-2", "--device", "cpu", "--no-baseline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py"), "--out-dir", str(tmp_path / "ddp")] + common
    proc = subprocess.Popen(ddp, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Meanwhile the 1-process reference runs here (same flags: micro-batch 2 -> 2 accumulation micro-steps).
    train_gpt = _train_gpt()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float summation order as the workers (OMP_NUM_THREADS=1)
    try:
        train_gpt.main(["--out-dir", str(tmp_path / "one")] + common)
    finally:
        torch.set_num_threads(threads)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    a = load_file(tmp_path / "ddp" / "last" / "model.safetensors")
    b = load_file(tmp_path / "one" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * b[k].norm() + 1e-8, k
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 3 and "val_loss" in r for r in rows)
    state = torch.load(tmp_path / "ddp" / "last" / "train_state.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2  # one RNG state per rank
    assert json.loads((tmp_path / "ddp" / "last" / "config.json").read_text())["model_type"] == "gpt"


def test_affine_by_hand():
    img = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3)
    zero = np.zeros(1)
    # whole-pixel moves shift the grid, zeros come in
    assert codebook.affine(img, zero, [1], zero)[0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert codebook.affine(img, zero, zero, [-1])[0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    # half a pixel: each pixel is the mean of itself and its neighbour on the side it comes from
    assert np.allclose(codebook.affine(img, zero, zero, [0.5])[0], [[0.5, 1.5, 2.5], [2, 4.5, 5.5], [3.5, 7.5, 8.5]])
    # a quarter turn is np.rot90 (counter-clockwise as printed); a full turn changes nothing
    assert np.allclose(codebook.affine(img, [90], zero, zero)[0], np.rot90(img[0]), atol=1e-6)
    assert np.allclose(codebook.affine(img, [360], zero, zero)[0], img[0], atol=1e-5)


def test_augment_keeps_the_originals_first_and_is_seeded():
    imgs = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    a = codebook.augment(imgs, copies=3, rotate=10, shift=1, seed=0)
    assert a.shape == (15, 8, 8) and np.array_equal(a[:5], imgs)
    assert np.array_equal(a, codebook.augment(imgs, 3, 10, 1, seed=0))
    assert not np.allclose(a[5:10], imgs) and not np.allclose(a[5:10], a[10:])


def test_splits_are_disjoint_and_complete():
    s = codebook.split_indices(1797, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"test": 270, "val": 270, "train": 1257}
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(1797))


def test_micro_batches_of_unequal_length_sum_to_the_full_batch_gradient():
    """The loop divides each micro-batch's summed loss by the global target count (n_targets): two micro-batches
    with 3 and 8 scored positions then give the gradient of the whole batch's mean, which equal-weighted
    micro-batch means would not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    x = torch.randint(0, 20, (2, 8))
    y = torch.randint(0, 20, (2, 8))
    y[0, 3:] = -100                                   # 3 targets in the first row, 8 in the second
    def grads(*parts):
        model.zero_grad()
        for part in parts:
            part().backward()
        return model.lm_head.weight.grad.clone()
    full = grads(lambda: model(x, y)[1])
    n = int((y != -100).sum())
    split = grads(lambda: model(x[:1], y[:1], n_targets=n)[1], lambda: model(x[1:], y[1:], n_targets=n)[1])
    means = grads(lambda: model(x[:1], y[:1])[1] / 2, lambda: model(x[1:], y[1:])[1] / 2)
    assert torch.allclose(split, full, atol=1e-6) and not torch.allclose(means, full, atol=1e-4)
