"""The numeric head: <num><v> parsing, the value embedding at <num>, the regression target one position
earlier, the loss CE + alpha * MSE by hand, gradients, generation with a KV cache vs a full forward, data."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from nanovlm.data import VLMDataset, collate, load_dataset
from nanovlm.numeric import NumericConfig, NumericVLM, format_numbers, format_value, parse_numbers, strip_numbers, symexp, symlog
from nanovlm.siglip import SiglipImages
from nanovlm.vlm import VLM, VLMConfig

IMG, NUM, STOP = 5, 7, 3

# -----------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, stripped, values", [
    ("销售额：<num><1234.56>万元，增长率：<num><15.8>%", "销售额：<num>万元，增长率：<num>%", [1234.56, 15.8]),
    ("<num><-3><num><+4.5e-3>", "<num><num>", [-3.0, 0.0045]),                 # adjacent, signs, exponent
    ("a <num><1E6> b <num><.5> c <num><7.> d", "a <num> b <num> c <num> d", [1e6, 0.5, 7.0]),
    ("x=<num>< -2.5e+2 >!", "x=<num>!", [-250.0]),                               # spaces inside are allowed
    ("no numbers 12 here", "no numbers 12 here", []),
    ("", "", []),
])
def test_parse_numbers(text, stripped, values):
    out, vals = parse_numbers(text)
    assert out == stripped and vals == pytest.approx(values, rel=0, abs=0)
    again = format_numbers(out, vals)                    # the inverse: same text back, same values again
    assert parse_numbers(again) == (out, vals)


def test_format_is_exact_and_short():
    for v in [0.1 + 0.2, -1.5e-7, 1234.56, 3.0, -0.0, 1e20, 123456789.125]:
        assert float(format_value(v)) == v
    assert format_numbers("<num> and <num>", [3.0, 1234.56]) == "<num><3> and <num><1234.56>"
    assert format_numbers("销售额：<num>万元", [1234.56]) == "销售额：<num><1234.56>万元"
    with pytest.raises(ValueError, match="1 <num> token"):
        format_numbers("<num>", [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        format_value(float("nan"))


@pytest.mark.parametrize("bad", ["<num><abc>", "value <num> missing", "<num><1.2.3>", "<num><nan>", "<num>1.5",
                                 "ok <num><1> then <num><>"])
def test_malformed_is_an_error_naming_the_sample(bad):
    with pytest.raises(ValueError, match=r"charts\.json:12: malformed number"):
        parse_numbers(bad, where="charts.json:12")
    with pytest.raises(ValueError, match=r"charts\.json:12"):
        strip_numbers(bad, where="charts.json:12")
    parse_numbers(bad, strict=False)                      # scoring a completion: skipped, not an error


def test_strip_numbers_keeps_the_digits_as_written():
    assert strip_numbers("销售额：<num><1234.560>万元 <num><-1e3>") == "销售额：1234.560万元 -1e3"


def test_symlog_inverse():
    x = torch.tensor([-1e6, -3.5, 0.0, 0.25, 1234.56])
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-5)
    assert torch.allclose(symlog(x), torch.sign(x) * torch.log1p(x.abs()))

# -----------------------------------------------------------------------------
# the model


def tiny_vlm(seed=0, alpha=1.0, transform="symlog", tie=True):
    torch.manual_seed(seed)
    cfg = tiny_config(lm=dict(vocab_size=32, tie_word_embeddings=tie), image_token_id=IMG, stop_token_ids=(STOP,),
                      numeric=NumericConfig(NUM, hidden=16, transform=transform, loss_weight=alpha))
    return NumericVLM(cfg).eval()


def test_off_by_default_and_recorded_in_checkpoints(tmp_path):
    cfg = tiny_vlm().cfg
    plain = VLM(VLMConfig(lm=cfg.lm, vision=cfg.vision, projector=cfg.projector, image_token_id=IMG))
    assert not hasattr(plain, "numeric") and plain.cfg.to_dict()["numeric"] is None
    m = tiny_vlm()
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["numeric"]["num_token_id"] == NUM
    back = VLM.from_pretrained(tmp_path)   # the config says numeric: the right class comes back
    assert isinstance(back, NumericVLM) and back.cfg.numeric == m.cfg.numeric
    assert torch.equal(back.numeric.head.proj.weight, m.numeric.head.proj.weight)


def test_value_embedding_added_at_num_positions():
    m = tiny_vlm()
    ids = torch.tensor([[1, NUM, 2, NUM], [NUM, 4, 0, 0]])
    values = torch.tensor([1234.56, -2.0, 0.5])
    x = m.embed(ids, num_values=values)
    tok = m.lm.embed_tokens(ids)
    ve = m.numeric.value_embed(symlog(values))           # (3, C), in reading order
    assert torch.allclose(x[0, 1], tok[0, 1] + ve[0]) and torch.allclose(x[0, 3], tok[0, 3] + ve[1])
    assert torch.allclose(x[1, 0], tok[1, 0] + ve[2])
    keep = ids != NUM
    assert torch.equal(x[keep], tok[keep])
    with pytest.raises(ValueError, match=r"\[2, 1\] <num> tokens per row but 2 value"):
        m.embed(ids, num_values=values[:2])


def batch():
    # Row 0: a user number (input only, label -100) then two answer numbers; row 1: one answer number.
    ids = torch.tensor([[1, NUM, 2, 8, NUM, 9, NUM, STOP], [1, 10, 11, NUM, 12, STOP, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 3:6] = ids[1, 3:6]
    mask = ids != 0
    values = torch.tensor([7.0, 1234.56, -0.25, 15.8])  # reading order: row 0's three, then row 1's
    return ids, labels, mask, values


@pytest.mark.parametrize("alpha, transform", [(1.0, "symlog"), (0.3, "identity")])
def test_loss_is_ce_plus_alpha_mse_by_hand(alpha, transform):
    m = tiny_vlm(alpha=alpha, transform=transform)
    ids, labels, mask, values = batch()
    out = m(ids, attention_mask=mask, labels=labels, num_values=values)
    # By hand: the full forward's hidden states, CE over labelled next tokens, MSE at the positions before
    # the trained <num> tokens (row 0: 3 and 5, row 1: 2), against the transformed values.
    h = m.lm.hidden_states(inputs_embeds=m.embed(ids, num_values=values), attention_mask=mask)
    logits = m.lm.logits(h)
    ce = [F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
          for b in range(2) for t in range(ids.shape[1] - 1) if labels[b, t + 1] != -100]
    ce = torch.stack(ce).mean()
    t = (lambda v: torch.sign(v) * torch.log1p(v.abs())) if transform == "symlog" else (lambda v: v)
    pred = torch.stack([m.numeric.head(h[0, 3]), m.numeric.head(h[0, 5]), m.numeric.head(h[1, 2])])
    mse = ((pred - t(values[1:])) ** 2).mean()
    assert out["n_numbers"] == 3 and out["n_tokens"] == 7
    assert torch.allclose(out["token_ce"], ce, atol=1e-5) and torch.allclose(out["numeric_mse"], mse, atol=1e-5)
    assert torch.allclose(out["loss"], ce + alpha * mse, atol=1e-5)


def test_regression_target_sits_before_num():
    """Changing a value changes the head's prediction only from its <num> on (causal): the target at t is
    read from the state that predicts <num>, which has not seen the value yet."""
    m = tiny_vlm()
    ids, labels, mask, values = batch()
    a = m(ids, attention_mask=mask, num_values=values)["numeric"]
    other = values.clone()
    other[1] = 99.0                                       # the <num> at row 0, position 4
    b = m(ids, attention_mask=mask, num_values=other)["numeric"]
    assert torch.equal(a[0, :4], b[0, :4]) and not torch.allclose(a[0, 4:], b[0, 4:])
    assert torch.equal(a[1], b[1])
    # the loss sees the change of target at position 3 only through the MSE
    la = m(ids, attention_mask=mask, labels=labels, num_values=values)
    m.numeric.head.proj.bias.data += 1.0                  # moves every prediction: only the MSE changes
    lb = m(ids, attention_mask=mask, labels=labels, num_values=values)
    assert torch.allclose(la["token_ce"], lb["token_ce"]) and not torch.allclose(la["numeric_mse"], lb["numeric_mse"])


def test_gradients_reach_value_embedding_and_head():
    m = tiny_vlm().train()
    ids, labels, mask, values = batch()
    m(ids, attention_mask=mask, labels=labels, num_values=values)["loss"].backward()
    for name, p in m.numeric.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    m.zero_grad()
    no_num = torch.tensor([[1, 2, 8, STOP]])              # a batch without numbers: a zero MSE, no NaN
    out = m(no_num, labels=no_num, num_values=torch.zeros(0))
    assert out["numeric_mse"] == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in m.numeric.parameters())


def test_generate_with_kv_cache_matches_full_forward():
    m = tiny_vlm(seed=1, tie=False)
    # Make <num> likely but not certain under greedy decoding: logits are h @ W^T; give <num> a random row
    # and zero the others except a couple, so the choice depends on the hidden state.
    with torch.no_grad():
        w = m.lm.lm_head.weight
        w.mul_(0.0)
        w[NUM] = torch.randn(w.shape[1])
        w[12] = torch.randn(w.shape[1]) * 0.5
        w[13] = torch.randn(w.shape[1]) * 0.5
    prompts = [[1, NUM, 2, 8], [1, 4, 6, NUM, 9, NUM, 2]]
    prompt_values = [3.5, -120.0, 0.01]
    tokens, preds = m.generate_numbers(prompts, max_new_tokens=10, num_values=prompt_values)
    assert m.generate(prompts, max_new_tokens=10, num_values=prompt_values) == tokens   # one return type
    n_num = sum(len(p) for p in preds)
    assert n_num >= 2 and any(t != NUM for row in tokens for t in row)   # the test exercises both kinds
    for b, (prompt, row, pr) in enumerate(zip(prompts, tokens, preds)):
        assert [row[p["position"]] for p in pr] == [NUM] * row.count(NUM)
        pv = prompt_values[1:] if b == 1 else prompt_values[:1]
        seq = torch.tensor([prompt + row])
        out = m(seq, num_values=torch.tensor(pv + [p["value"] for p in pr]))
        full_tokens = out["logits"][0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert full_tokens == row                       # greedy: the same tokens
        for p in pr:                                   # the same values, read one position before <num>
            t = len(prompt) + p["position"] - 1
            assert math.isclose(out["numeric"][0, t].item(), p["value"], rel_tol=1e-4, abs_tol=1e-5)

# -----------------------------------------------------------------------------
# data


class FakeTok:
    """Just enough of tokenizer.Tokenizer for VLMDataset: one id per character, <num> one token."""
    num = 99

    def encode_chat(self, messages, image_tokens, system=None, where=None):
        ids = []
        for m in messages:
            for k, part in enumerate(m["content"].split("<num>")):
                ids += ([self.num] if k else []) + [ord(c) for c in part]
        return ids, list(ids)

    def chat_lengths(self, conversations, image_tokens, system=None, wheres=None):
        return [len(self.encode_chat(m, image_tokens)[0]) for m in conversations]


def test_dataset_parses_numbers_in_every_turn():
    s = [{"images": [], "where": "d.json:1", "messages": [
        {"role": "user", "content": "x is <num><2.5>, y?"}, {"role": "assistant", "content": "<num><-1e3>元"}]},
        {"images": [], "where": "d.json:2", "messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "<num><7>"}]}]
    ds = VLMDataset(s, FakeTok(), SiglipImages(8, 4), 100, system=None, numeric=True)
    assert ds[0]["num_values"].tolist() == [2.5, -1000.0] and ds[0]["input_ids"].tolist().count(99) == 2
    b = collate([ds[0], ds[1]], pad_id=0)
    assert b["num_values"].tolist() == [2.5, -1000.0, 7.0]
    digits = VLMDataset(s, FakeTok(), SiglipImages(8, 4), 100, system=None, numeric=False)   # no head: plain digits
    assert "num_values" not in digits[0] and 99 not in digits[0]["input_ids"].tolist()
    assert "".join(map(chr, digits[0]["input_ids"].tolist())) == "x is 2.5, y?-1e3元"
    bad = [{"images": [], "where": "d.json:7", "messages": [{"role": "user", "content": "?"},
                                                            {"role": "assistant", "content": "<num><abc>"}]}]
    for numeric in (True, False):
        with pytest.raises(ValueError, match=r"d\.json:7: malformed number"):
            VLMDataset(bad, FakeTok(), SiglipImages(8, 4), 100, system=None, numeric=numeric)


def test_synthetic_charts(tmp_path):
    from nanovlm import synthetic
    out = synthetic.generate(str(tmp_path / "s"), n_train=12, n_val=6, seed=0)
    train = load_dataset(f"{out}/charts_train.json")
    val = load_dataset(f"{out}/charts_val.json")
    assert len(train) == 12 and len(val) == 6 and all(len(x["messages"]) == 2 for x in val)
    assert {x["qtype"] for x in train + val} <= {"chart_value", "chart_total"}
    for x in train + val:
        chart = x["chart"]
        for q, a in zip(x["messages"][::2], x["messages"][1::2]):
            _, (v,) = parse_numbers(a["content"])
            q = q["content"].removeprefix("<image>\n")
            if q == "What is the total?":
                assert v == pytest.approx(sum(chart["values"]), abs=0.051)
            else:
                label = q.removeprefix("What is the value of ").removesuffix("?")
                label = label.removeprefix("the ").removesuffix(" bar").removeprefix("point ")
                assert v == chart["values"][chart["labels"].index(label)]


def test_ensure_synthetic_adds_charts_to_an_older_dataset(tmp_path):
    from nanovlm import synthetic
    out = str(tmp_path / "s")
    synthetic.ensure_synthetic(out, n_train=5, n_val=3, seed=1)
    full = open(f"{out}/charts_train.json").read()
    for split in ("train", "val"):
        os.remove(f"{out}/charts_{split}.json")   # as if made before charts existed
    synthetic.ensure_synthetic(out, n_train=5, n_val=3, seed=1)
    assert open(f"{out}/charts_train.json").read() == full and os.path.exists(f"{out}/charts_val.json")
