"""Data: each format read from hand-written files, mixing, every error case, VLMDataset, collate,
and the synthetic generator (determinism, answers vs what was drawn)."""
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm import synthetic
from nanovlm.data import VLMDataset, collate, load_data, load_dataset, pack, parse_data_spec
from nanovlm.siglip import SiglipImages
from nanovlm.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(["Describe the image. A red circle. What is written? KQX ¥12.50"] * 20, 300)


def png(path, size=64, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_llava_json_list(tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "b.png")
    f = write(tmp_path / "llava.json", """[
  {"id": "x1", "image": "a.png",
   "conversations": [{"from": "human", "value": "<image>\\nDescribe it."}, {"from": "gpt", "value": "A cat."}]},
  {"id": "x2", "conversations": [{"from": "system", "value": "Be brief."},
                                 {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
  {"image": ["a.png", "b.png"], "qtype": "count",
   "conversations": [{"from": "human", "value": "<image><image> How many?"}, {"from": "gpt", "value": "2"}]}
]""")
    s = load_dataset(f)
    assert [x["where"] for x in s] == [f"{f}:2", f"{f}:4", f"{f}:6"]
    assert s[0]["images"] == [str(tmp_path / "a.png")] and s[0]["id"] == "x1"
    assert s[0]["messages"] == [{"role": "user", "content": "<image>\nDescribe it."},
                                {"role": "assistant", "content": "A cat."}]
    assert s[1]["images"] == [] and [m["role"] for m in s[1]["messages"]] == ["system", "user", "assistant"]
    assert s[2]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")] and s[2]["qtype"] == "count"


def test_role_content_jsonl_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    png(tmp_path / "imgs" / "c.jpg")
    f = write(tmp_path / "mm.jsonl",
              '{"images": ["c.jpg"], "conversations": [{"role": "user", "content": "看这张图 <image> 是什么?"}, '
              '{"role": "assistant", "content": "猫"}]}\n'
              '\n'
              '{"image": "c.jpg", "messages": [{"role": "user", "content": "<image>"}, '
              '{"role": "assistant", "content": "x"}], "solution": "x"}\n')
    s = load_dataset(f, image_root=str(tmp_path / "imgs"))
    assert [x["where"] for x in s] == [f"{f}:1", f"{f}:3"]
    assert s[0]["images"] == [str(tmp_path / "imgs" / "c.jpg")]
    assert s[0]["messages"][0] == {"role": "user", "content": "看这张图 <image> 是什么?"}
    assert s[1]["solution"] == "x"


def test_ocr_jsonl(tmp_path):
    png(tmp_path / "o.png")
    f = write(tmp_path / "ocr.jsonl",
              '{"query": "What is written?", "response": "¥12.50", "image_path": "o.png"}\n'
              '{"query": "Read <image> please", "response": "KQX", "image_path": "o.png"}\n')
    s = load_dataset(f)
    assert s[0]["messages"] == [{"role": "user", "content": "<image>\nWhat is written?"},
                                {"role": "assistant", "content": "¥12.50"}]
    assert s[1]["messages"][0]["content"] == "Read <image> please"
    assert s[0]["images"] == [str(tmp_path / "o.png")]


def test_parse_data_spec():
    assert parse_data_spec("a.jsonl:2 b.json:1") == [("a.jsonl", 2.0), ("b.json", 1.0)]
    assert parse_data_spec(["x.json", "y.jsonl:0.5,z.json"]) == [("x.json", 1.0), ("y.jsonl", 0.5), ("z.json", 1.0)]
    assert parse_data_spec("C:/data/x.json") == [("C:/data/x.json", 1.0)]
    with pytest.raises(ValueError, match="a.json:0"):
        parse_data_spec("a.json:0")


def test_mixing_weights(tmp_path):
    rec = '{"query": "q%d", "response": "r"}\n'
    a = write(tmp_path / "a.jsonl", "".join(rec % i for i in range(10)))
    b = write(tmp_path / "b.jsonl", "".join(rec % i for i in range(100)))
    s = load_data(f"{a}:2 {b}:1", total=300, seed=1)
    per_file = Counter(x["where"].rsplit(":", 1)[0] for x in s)
    assert per_file == {a: 200, b: 100}
    per_sample = Counter(x["where"] for x in s)
    assert all(per_sample[f"{a}:{i}"] == 20 for i in range(1, 11))   # the short file repeats evenly
    assert all(per_sample[f"{b}:{i}"] == 1 for i in range(1, 101))
    # default total = all samples: 110 drawn 2:1
    assert Counter(x["where"].rsplit(":", 1)[0] for x in load_data([f"{a}:2", f"{b}:1"])) == {a: 73, b: 37}


@pytest.mark.parametrize("name,text,match", [
    ("missing.jsonl", '{"query": "q", "response": "r"}\n{"query": "q", "response": "r", "image_path": "nope.png"}\n',
     r"missing.jsonl:2: image file not found: .*nope.png"),
    ("bad.jsonl", '{"query": "q", "response": "r"}\n\n{"query": "q", "response": \n', r"bad.jsonl:3: malformed JSON"),
    ("bad.json", '[\n {"query": "q", "response": "r"},\n {"query": "q" "response": "r"}\n]',
     r"bad.json:3: malformed JSON"),
    ("tags.json", '[{"image": "ok.png", "conversations": [{"from": "human", "value": "no tag"}, '
     '{"from": "gpt", "value": "x"}]}]', r"tags.json:1: 0 <image> tag\(s\) in the text but 1 image"),
    ("tags2.jsonl",
     '{"conversations": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]}',
     r"tags2.jsonl:1: 1 <image> tag\(s\) in the text but 0 image"),
    ("role.jsonl", '{"query": "q", "response": "r"}\n{"conversations": [{"from": "robot", "value": "x"}]}\n',
     r"role.jsonl:2: turn 0 has unknown role 'robot'"),
    ("format.jsonl", '{"text": "hello"}\n', r"format.jsonl:1: unknown record format"),
])
def test_errors_name_file_and_line(tmp_path, name, text, match):
    png(tmp_path / "ok.png")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_dataset(write(tmp_path / name, text))


def test_corrupt_image_named_at_load_or_getitem(tmp_path, tok):
    """A file that is no image is found when the data is loaded (its header is opened); one truncated past a
    valid header only when a batch decodes it. Both errors name the sample and the file."""
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    f = write(tmp_path / "c.jsonl", '{"query": "q", "response": "r", "image_path": "bad.png"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1: cannot read image .*bad.png"):
        load_dataset(f)
    png(tmp_path / "bad.png")   # now a truncated one
    data = (tmp_path / "bad.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[:len(data) // 2])
    ds = VLMDataset(load_dataset(f), tok, images=SiglipImages(32, 4), max_length=100)
    with pytest.raises(ValueError, match=r"c.jsonl:1: cannot read image .*bad.png"):
        ds[0]


def test_getitem_tokens_and_pixels(tmp_path, tok):
    arr = png(tmp_path / "o.png", size=32)
    f = write(tmp_path / "o.jsonl", '{"query": "What is written?", "response": "KQX", "image_path": "o.png"}\n')
    item = VLMDataset(load_dataset(f), tok, images=SiglipImages(32, 3), max_length=100, system=None)[0]
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>\n"
            "What is written?<|im_end|>\n<|im_start|>assistant\nKQX<|im_end|>\n")
    assert item["input_ids"].tolist() == tok.tok.encode(text).ids
    answer = tok.tok.encode("KQX").ids + [tok.im_end]
    trained = [t for t in item["labels"].tolist() if t != -100]
    assert trained == answer and item["labels"][-1] == -100
    want = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)   # same size: no resize
    assert item["images"]["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(item["images"]["pixel_values"][0], want, atol=1e-6, rtol=0)
    assert item["where"] == f"{f}:1"


def test_long_samples_error_and_drop(tmp_path, tok, capsys):
    png(tmp_path / "o.png")
    rows = ['{"query": "q", "response": "r", "image_path": "o.png"}',
            '{"query": "q", "response": "%s", "image_path": "o.png"}' % ("KQX " * 30),
            '{"query": "q", "response": "r"}']
    f = write(tmp_path / "l.jsonl", "\n".join(rows) + "\n")
    s = load_dataset(f)
    long_text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>\nq<|im_end|>\n"
                 "<|im_start|>assistant\n" + "KQX " * 30 + "<|im_end|>\n")
    n_long = len(tok.tok.encode(long_text).ids)
    short_text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>\nq<|im_end|>\n"
                  "<|im_start|>assistant\nr<|im_end|>\n")
    max_length = len(tok.tok.encode(short_text).ids)   # the first sample fits exactly
    want = rf"1 sample\(s\) longer than max_length={max_length}: {re.escape(f)}:2 \({n_long} tokens\)"
    with pytest.raises(ValueError, match=want):
        VLMDataset(s, tok, images=SiglipImages(16, 8), max_length=max_length, system=None)
    ds = VLMDataset(s, tok, images=SiglipImages(16, 8), max_length=max_length, drop_long=True, system=None)
    assert ds.n_dropped == 1 and len(ds) == 2 and [ds[i]["where"] for i in range(2)] == [f"{f}:1", f"{f}:3"]
    assert (f"data {f}: 2 samples (3 records), 1 dropped: longer than max_length={max_length}, first {f}:2 "
            f"({n_long} tokens)") in capsys.readouterr().out
    assert ds[1]["images"]["pixel_values"].shape == (0, 3, 16, 16)


def test_collate_padding():
    img = torch.randn(2, 3, 8, 8)
    batch = [dict(input_ids=torch.tensor([5, 6, 7]), labels=torch.tensor([-100, 6, 7]), images={"pixel_values": img[:1]},
                  where="a:1"),
             dict(input_ids=torch.tensor([1, 2, 3, 4, 5]), labels=torch.tensor([-100, -100, 3, 4, 5]),
                  images={"pixel_values": torch.zeros(0, 3, 8, 8)}, where="b:2"),
             dict(input_ids=torch.tensor([9]), labels=torch.tensor([9]), images={"pixel_values": img[1:]}, where="c:3")]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 5], [9, -100, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]
    assert out["attention_mask"].dtype == torch.bool and "num_values" not in out
    assert torch.equal(out["pixel_values"], img) and out["where"] == ["a:1", "b:2", "c:3"]
    empty = collate(batch[1:2], pad_id=0)
    assert empty["pixel_values"].shape == (0, 3, 8, 8)


def test_pack_rows_by_hand():
    """Lengths 5, 4, 3, 2 (samples a, b, c, d) into rows of 8, first fit, longest first: a -> row 0, b -> row 1,
    c -> row 0 (full), d -> row 1. Images, <num> values and `where` follow the packed reading order a, c, b, d,
    the order in which the VLM fills image-pad slots and <num> tokens."""
    img = torch.randn(3, 3, 8, 8)
    none = torch.zeros(0, 3, 8, 8)
    batch = [dict(input_ids=torch.arange(1, 6), labels=torch.tensor([-100, -100, 3, 4, 5]), images={"pixel_values": img[:1]},
                  where="a", num_values=torch.tensor([1.0, 2.0])),
             dict(input_ids=torch.arange(11, 15), labels=torch.tensor([-100, -100, -100, 14]), images={"pixel_values": img[1:2]},
                  where="b", num_values=torch.tensor([3.0])),
             dict(input_ids=torch.arange(21, 24), labels=torch.tensor([-100, 22, 23]), images={"pixel_values": img[2:]},
                  where="c", num_values=torch.tensor([4.0])),
             dict(input_ids=torch.arange(31, 33), labels=torch.tensor([31, 32]), images={"pixel_values": none}, where="d",
                  num_values=torch.zeros(0))]
    out = pack(batch, pad_id=0, max_length=8)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 21, 22, 23], [11, 12, 13, 14, 31, 32, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4, 5, -100, 22, 23], [-100, -100, -100, 14, 31, 32, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]]
    assert out["where"] == ["a", "c", "b", "d"]
    assert torch.equal(out["pixel_values"], img[[0, 2, 1]]) and out["num_values"].tolist() == [1.0, 2.0, 4.0, 3.0]
    with pytest.raises(ValueError, match="a: 5 tokens do not fit a packed row of max_length=4"):
        pack(batch, pad_id=0, max_length=4)


# -----------------------------------------------------------------------------
# synthetic


def tree_hash(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode() + open(p, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("syn")), n_train=60, n_val=10, seed=3)


def test_synthetic_deterministic(syn, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), n_train=60, n_val=10, seed=3)
    other = synthetic.generate(str(tmp_path / "other"), n_train=60, n_val=10, seed=4)
    assert tree_hash(syn) == tree_hash(again) != tree_hash(other)


def expected_answer(q, scene):
    """Answer each question from the recorded scene, written independently of the generator."""
    objs = scene["objects"]
    at = {o["position"]: o for o in objs}
    if q == "What does the text say?":
        return scene["text"]
    if q.startswith("What colour is the shape in the "):
        return at[q[len("What colour is the shape in the "):-1]]["colour"]
    if q.startswith("What shape is in the "):
        return at[q[len("What shape is in the "):-1]]["shape"]
    if q.startswith("Where is the "):
        colour, shape = q[len("Where is the "):-1].split()
        (pos,) = [o["position"] for o in objs if o["colour"] == colour and o["shape"] == shape]
        return pos
    if q == "How many shapes are there?":
        return str(len(objs))
    word = q.split()[2]   # "How many red shapes" / "How many circles"
    if word in synthetic.COLOURS:
        return str(sum(o["colour"] == word for o in objs))
    return str(sum(o["shape"] + "s" == word for o in objs))


def test_synthetic_answers_match_drawing(syn):
    scenes = {s["image"]: s for s in map(json.loads, open(os.path.join(syn, "scenes_train.jsonl")))}
    sft = load_dataset(os.path.join(syn, "sft_train.json"))
    assert len(sft) == 60 and {x["qtype"] for x in sft} >= {"colour", "shape", "count", "text"}
    for x in sft:
        rel = os.path.relpath(x["images"][0], syn)
        for user, answer in zip(x["messages"][::2], x["messages"][1::2]):   # every turn of the conversation
            q = user["content"].removeprefix("<image>\n")
            assert answer["content"] == expected_answer(q, scenes[rel]), x["where"]
        pixels = np.asarray(Image.open(x["images"][0]))
        assert pixels.shape == (96, 96, 3)   # the default size: 3x3 cells of 32 px, one image token each
        for o in scenes[rel]["objects"]:   # the drawn colour really is at the recorded centre, in the named cell
            cx, cy = o["center"]
            assert tuple(pixels[cy, cx]) == synthetic.COLOURS[o["colour"]]
            assert synthetic.POSITIONS[cy // 32][cx // 32] == o["position"]
        if scenes[rel]["text"]:
            assert (pixels < 100).any()   # some dark (text) pixels
    assert max(len(x["messages"]) for x in sft) == 2 * synthetic.TRAIN_TURNS     # several questions per image
    assert all(len(x["messages"]) == 2 for x in load_dataset(os.path.join(syn, "sft_val.json")))
    captions = load_dataset(os.path.join(syn, "captions_val.json"))
    assert len(captions) == 10 and all(len(c["images"]) == 1 for c in captions)
    ocr = load_dataset(os.path.join(syn, "ocr_train.jsonl"))
    assert len(ocr) == 60 and all(c["messages"][0]["content"].startswith("<image>\n") for c in ocr)
    assert all(c["qtype"] in ("digits", "amount", "letters") for c in ocr)


def test_ensure_synthetic_skips_when_done(tmp_path):
    out = str(tmp_path / "s")
    synthetic.ensure_synthetic(out, n_train=5, n_val=2, seed=0)
    marker = os.path.join(out, "DONE.json")
    t = os.stat(marker).st_mtime_ns
    synthetic.ensure_synthetic(out, n_train=5, n_val=2, seed=0)
    assert os.stat(marker).st_mtime_ns == t
    synthetic.ensure_synthetic(out, n_train=6, n_val=2, seed=0)   # other parameters: regenerated
    assert len(load_dataset(os.path.join(out, "sft_train.json"))) == 6
    assert [p for p in os.listdir(tmp_path)] == ["s"]   # no temporary folder left behind
