"""
The offline synthetic dataset: small images of coloured shapes and short rendered strings, with
captions (stage 1, pretraining the projector), questions with short exact answers (stage 2, SFT) and
OCR pairs (stage 3, GRPO). It lets the whole pipeline run and be evaluated without a download, and
because every answer is exact, accuracy per question type says what the model has really learnt.

Everything is written in the formats people already use, so the real loaders in data.py read it:

    out_dir/
      images/{train,val}/000123.png        scenes: 1-4 shapes on a 3x3 grid, or a short word
      images/{train,val}/ocr_000123.png    OCR: digits, ¥/$ amounts, capital letters
      captions_{train,val}.json            LLaVA format  {"id", "image", "conversations": [{"from", "value"}]}
      sft_{train,val}.json                 LLaVA format + "qtype" (of the first question): colour|shape|count|
                                           position|text; training scenes carry up to 4 questions each
      ocr_{train,val}.jsonl                {"query", "response", "image_path", "qtype"}
      images/{train,val}/chart_000123.png  charts: 3-5 coloured bars or a 4-6 point line, y axis 0..top
      charts_{train,val}.json              LLaVA format + "qtype" chart_value|chart_total + "chart" (what was
                                           drawn); answers are numbers written <num><v> (numeric.py)
      scenes_{train,val}.jsonl             what was drawn (for tests and error analysis)
      tokenizer.json                       a byte-level BPE trained on the dataset's language (synthetic_tokenizer)
      DONE.json                            written last, holds the parameters: a finished dataset

Image paths are relative to out_dir. Generation is deterministic for a seed (same bytes every run)
and fast (about a thousand images per second: 96x96 PNGs drawn with PIL). Charts are drawn at the same
--image-size as everything else: it is the model's input resolution (a bigger chart would only be shrunk
back by the preprocessing), and the drawing is made to read at 64 or 96 pixels: thick bars, one labelled
gridline at the axis top (10, 50, 100, 500 or 1000), values to 5% of the axis height.

    python -m nanovlm.synthetic --out-dir data/synthetic --n-train 20000 --n-val 1000 --seed 0
"""

import argparse
import json
import os
import random
import re
import shutil
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from nanovlm.numeric import format_value
from nanovlm.tokenizer import Tokenizer, train_tiny_tokenizer

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ["circle", "square", "triangle", "diamond"]
POSITIONS = [["top left", "top middle", "top right"],
             ["middle left", "center", "middle right"],
             ["bottom left", "bottom middle", "bottom right"]]   # POSITIONS[row][col]
NUMBER_WORDS = ["no", "one", "two", "three", "four"]
CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Give a short description of the image.",
                   "Describe what you see."]
BACKGROUND = (255, 255, 255)
TEXT_FRACTION = 0.2   # share of scenes that show a word instead of shapes
TRAIN_TURNS = 4       # questions per training conversation about a shapes scene (validation: 1)
PNG = dict(compress_level=1)   # lossless either way; encodes several times faster than the default 6
CHART_TOPS = [10, 50, 100, 500, 1000]   # the y axis runs 0..top; top is written on the chart
CHART_TURNS = 3       # questions per training conversation about a chart (validation: 1)
TOKENIZER_VOCAB = 1024


@lru_cache(maxsize=None)
def font(size):
    # DejaVu Sans ships with matplotlib and has ¥ (PIL's built-in Aileron does not).
    try:
        import matplotlib
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def draw_text(image_size, text):
    """Black text, centred, in the largest font that fits 90% of the width (legible at 64x64 and up)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    size = image_size // 2
    size = min(size, int(size * 0.9 * image_size / d.textlength(text, font=font(size))))  # width ~ font size
    while size > 6 and d.textlength(text, font=font(size)) > 0.9 * image_size:
        size -= 1
    d.text((image_size / 2, image_size / 2), text, font=font(size), fill=(0, 0, 0), anchor="mm")
    return img


def draw_shape(d, shape, cx, cy, r, colour):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)


def random_scene(rng, image_size):
    """1-4 shapes in distinct cells of a 3x3 grid. Some repeat an earlier (colour, shape) so captions
    say "two blue squares" and counting is not always 1."""
    cells = rng.sample(range(9), rng.randint(1, 4))
    cell = image_size / 3
    objects = []
    for c in cells:
        if objects and rng.random() < 0.3:
            colour, shape = objects[-1]["colour"], objects[-1]["shape"]
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        row, col = divmod(c, 3)
        r = cell * rng.uniform(0.25, 0.38)
        jitter = cell / 2 - r - 1   # keep the shape inside its cell
        cx = round((col + 0.5) * cell + rng.uniform(-jitter, jitter))
        cy = round((row + 0.5) * cell + rng.uniform(-jitter, jitter))
        objects.append(dict(colour=colour, shape=shape, position=POSITIONS[row][col], center=[cx, cy],
                            radius=round(r, 2)))
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(d, o["shape"], *o["center"], o["radius"], COLOURS[o["colour"]])
    return img, objects


def plural(shape, n):
    return shape if n == 1 else shape + "s"


def caption(objects):
    # "There are 3 shapes: a red circle in the top left and two blue squares in the center and the bottom right."
    groups = {}
    for o in objects:
        groups.setdefault((o["colour"], o["shape"]), []).append(o["position"])
    parts = []
    for (colour, shape), where in groups.items():
        n = len(where)
        where = " and the ".join(where)
        article = ("an" if colour[0] in "aeiou" else "a") if n == 1 else NUMBER_WORDS[n]
        parts.append(f"{article} {colour} {plural(shape, n)} in the {where}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    return f"There {'is' if n == 1 else 'are'} {n} {plural('shape', n)}: {listed}."


def question(rng, objects):
    """One question about the scene with a short exact answer -> (qtype, question, answer)."""
    o = rng.choice(objects)
    unique = [p for p in objects if sum(q["colour"] == p["colour"] and q["shape"] == p["shape"]
                                        for q in objects) == 1]
    qtype = rng.choice(["colour", "shape", "count", "position"] if unique else ["colour", "shape", "count"])
    if qtype == "colour":
        return qtype, f"What colour is the shape in the {o['position']}?", o["colour"]
    if qtype == "shape":
        return qtype, f"What shape is in the {o['position']}?", o["shape"]
    if qtype == "position":
        o = rng.choice(unique)
        return qtype, f"Where is the {o['colour']} {o['shape']}?", o["position"]
    kind = rng.choice(["all", "colour", "shape"])   # count; the asked colour/shape may be absent: "0"
    if kind == "all":
        return qtype, "How many shapes are there?", str(len(objects))
    if kind == "colour":
        c = rng.choice(list(COLOURS))
        return qtype, f"How many {c} shapes are there?", str(sum(p["colour"] == c for p in objects))
    s = rng.choice(SHAPES)
    return qtype, f"How many {plural(s, 2)} are there?", str(sum(p["shape"] == s for p in objects))


def random_chart(rng, image_size):
    """A bar chart (3-5 bars, one colour each) or a line chart (4-6 points A, B, ...) with known values,
    on a y axis from 0 to `top` with one labelled gridline at top -> (image, chart record)."""
    S = image_size
    top = rng.choice(CHART_TOPS)
    kind = rng.choice(["bar", "line"])
    n = rng.randint(3, 5) if kind == "bar" else rng.randint(4, 6)
    decimals = 1 if top <= 100 else 0
    values = [round(top * rng.uniform(0.05, 1.0), decimals) for _ in range(n)]
    x0, x1, y_top, y0 = 0.08 * S, 0.97 * S, 0.25 * S, 0.95 * S   # plot area: y_top is the value `top`
    y_of = lambda v: y0 - (y0 - y_top) * v / top                 # noqa: E731
    img = Image.new("RGB", (S, S), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((x0, y_top - 1), str(top), font=font(max(7, S // 7)), fill=(0, 0, 0), anchor="ls")
    d.line([(x0, y_top), (x1, y_top)], fill=(170, 170, 170), width=1)   # the gridline at `top`
    width = max(1, S // 32)
    if kind == "bar":
        labels = rng.sample(list(COLOURS), n)
        slot = (x1 - x0) / n
        for k, (c, v) in enumerate(zip(labels, values)):
            d.rectangle([x0 + (k + 0.15) * slot, y_of(v), x0 + (k + 0.85) * slot, y0], fill=COLOURS[c])
    else:
        labels = [chr(ord("A") + k) for k in range(n)]
        colour = COLOURS[rng.choice(list(COLOURS))]
        xs = [x0 + (k + 0.5) * (x1 - x0) / n for k in range(n)]
        points = [(x, y_of(v)) for x, v in zip(xs, values)]
        d.line(points, fill=colour, width=width)
        for x, y in points:
            d.ellipse([x - 2 * width, y - 2 * width, x + 2 * width, y + 2 * width], fill=colour)
    d.line([(x0, y_top - 2), (x0, y0), (x1, y0)], fill=(0, 0, 0), width=width)   # axes
    return img, dict(kind=kind, top=top, labels=labels, values=values)


def chart_question(rng, chart):
    """-> (qtype, question, value): the value of one bar/point, or the total of all of them."""
    if rng.random() < 0.25:
        return "chart_total", "What is the total?", round(sum(chart["values"]), 1)
    k = rng.randrange(len(chart["values"]))
    x = f"the {chart['labels'][k]} bar" if chart["kind"] == "bar" else f"point {chart['labels'][k]}"
    return "chart_value", f"What is the value of {x}?", chart["values"][k]


def chart_sample(rng, out_dir, split, i, image_size):
    """Draw chart i of a split and save it -> its LLaVA record, answered with <num><v> numbers."""
    img, chart = random_chart(rng, image_size)
    image = f"images/{split}/chart_{i:06d}.png"
    img.save(os.path.join(out_dir, image), **PNG)
    qtype, q, v = chart_question(rng, chart)
    more = []
    for _ in range(CHART_TURNS - 1 if split == "train" else 0):
        _, q2, v2 = chart_question(rng, chart)
        if q2 != q and all(q2 != m[0] for m in more):
            more.append((q2, f"<num><{format_value(v2)}>"))
    return llava(f"{split}-{i}", image, q, f"<num><{format_value(v)}>", *more, qtype=qtype, chart=chart)


def add_charts(out_dir, n_train, n_val, seed, image_size):
    """Add the charts to a dataset generated before they existed: the same files generate() would write (the
    charts have their own random stream), each JSON written to a temporary name and renamed, so the other
    files are untouched and a job reading them meanwhile is not disturbed."""
    for split, n in (("train", n_train), ("val", n_val)):
        rng = random.Random(f"{seed}:{split}:charts")
        rows = [chart_sample(rng, out_dir, split, i, image_size) for i in range(n)]
        path = os.path.join(out_dir, f"charts_{split}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
        os.replace(path + ".tmp", path)


def random_word(rng, lo=3, hi=4):
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(rng.randint(lo, hi)))


def random_ocr_string(rng):
    kind = rng.choice(["digits", "amount", "letters"])
    if kind == "digits":
        return kind, "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    if kind == "amount":
        value = rng.randint(1, 999) if rng.random() < 0.3 else f"{rng.randint(0, 199)}.{rng.randint(0, 99):02d}"
        return kind, f"{rng.choice('¥$')}{value}"
    return kind, random_word(rng, 3, 5)


def llava(id, image, question, answer, *more, **extra):
    """One LLaVA record; `more` adds further (question, answer) turns about the same image."""
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    for q, a in more:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": id, "image": image, "conversations": turns, **extra}


def generate_split(out_dir, split, n, seed, image_size):
    rng = random.Random(f"{seed}:{split}")  # str seeds hash with sha512: the same on every machine and run
    chart_rng = random.Random(f"{seed}:{split}:charts")   # its own stream: the other files stay as they were
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    captions, sft, ocr, scenes, charts = [], [], [], [], []
    for i in tqdm(range(n), desc=f"synthetic {split}", unit="img", mininterval=1.0):
        image = f"images/{split}/{i:06d}.png"
        if rng.random() < TEXT_FRACTION:
            word = random_word(rng)
            img = draw_text(image_size, word)
            scenes.append({"image": image, "text": word, "objects": []})
            captions.append(llava(f"{split}-{i}", image, rng.choice(CAPTION_PROMPTS),
                                  f'The word "{word}" written in black.'))
            sft.append(llava(f"{split}-{i}", image, "What does the text say?", word, qtype="text"))
        else:
            img, objects = random_scene(rng, image_size)
            scenes.append({"image": image, "text": None, "objects": objects})
            captions.append(llava(f"{split}-{i}", image, rng.choice(CAPTION_PROMPTS), caption(objects)))
            qtype, q, a = question(rng, objects)
            # Training conversations ask several questions about one image: the image costs far more compute
            # than a one-word answer, so more answers per image is more learning per step. Validation keeps
            # one question per sample, so accuracy per question type is simple to read.
            more = []
            for _ in range(TRAIN_TURNS - 1 if split == "train" else 0):
                _, q2, a2 = question(rng, objects)
                if q2 != q and all(q2 != m[0] for m in more):
                    more.append((q2, a2))
            sft.append(llava(f"{split}-{i}", image, q, a, *more, qtype=qtype))
        img.save(os.path.join(out_dir, image), **PNG)
        # an OCR sample per scene, on its own image
        kind, text = random_ocr_string(rng)
        ocr_image = f"images/{split}/ocr_{i:06d}.png"
        draw_text(image_size, text).save(os.path.join(out_dir, ocr_image), **PNG)
        ocr.append({"query": "What is the text in the image?", "response": text, "image_path": ocr_image,
                    "qtype": kind})
        charts.append(chart_sample(chart_rng, out_dir, split, i, image_size))   # a chart per scene

    def dump(name, rows, jsonl):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            if jsonl:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                json.dump(rows, f, ensure_ascii=False, indent=1)
    dump(f"captions_{split}.json", captions, False)
    dump(f"sft_{split}.json", sft, False)
    dump(f"ocr_{split}.jsonl", ocr, True)
    dump(f"scenes_{split}.jsonl", scenes, True)
    dump(f"charts_{split}.json", charts, False)


def synthetic_tokenizer(data_dir):
    """The dataset's tokenizer: a byte-level BPE trained on the synthetic corpus once and kept beside it.

    Only the fixed language of the dataset (questions, captions, answer words) shapes the vocabulary, not the
    random strings the model must read (the words and OCR strings drawn in images): trained on those, BPE
    spends hundreds of merges on letter pairs ("QX", "KZ"), and reading a word becomes a guess among 500+
    pair tokens seen a few times each instead of 23 letters seen thousands of times."""
    path = Path(data_dir) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    texts = []
    for r in json.loads((Path(data_dir) / "captions_train.json").read_text()):
        texts += [re.sub(r'"[^"]*"', '""', t["value"].replace("<image>", "")) for t in r["conversations"]]
    for r in json.loads((Path(data_dir) / "sft_train.json").read_text()):
        texts += [t["value"].replace("<image>", "") for t in r["conversations"]
                  if t["from"] == "human" or r.get("qtype") != "text"]
    for line in (Path(data_dir) / "ocr_train.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["query"])
    tok = train_tiny_tokenizer(texts, TOKENIZER_VOCAB)
    tok.save(data_dir)
    return tok


def generate(out_dir, n_train=20000, n_val=1000, seed=0, image_size=96):
    params = dict(n_train=n_train, n_val=n_val, seed=seed, image_size=image_size)
    generate_split(out_dir, "train", n_train, seed, image_size)
    generate_split(out_dir, "val", n_val, seed, image_size)
    synthetic_tokenizer(out_dir)
    with open(os.path.join(out_dir, "DONE.json"), "w") as f:   # last: its presence means "complete"
        json.dump(params, f)
    return out_dir


def ensure_synthetic(out_dir, n_train=20000, n_val=1000, seed=0, image_size=96):
    """Generate the dataset unless out_dir already holds a finished one with these parameters.
    Built in a temporary sibling folder and renamed into place, so an interrupted run never leaves a
    half dataset that looks done. Under DDP call it on rank 0 only, then barrier."""
    params = dict(n_train=n_train, n_val=n_val, seed=seed, image_size=image_size)
    marker = os.path.join(out_dir, "DONE.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                if not os.path.exists(os.path.join(out_dir, "charts_val.json")):   # made before charts existed
                    add_charts(out_dir, **params)
                synthetic_tokenizer(out_dir)   # made before the tokenizer was part of the dataset
                return out_dir
    tmp = f"{os.path.normpath(out_dir)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, n_train, n_val, seed, image_size)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Generate the offline synthetic VLM dataset (shapes, text, OCR, charts) "
                                "and its tokenizer.")
    p.add_argument("--out-dir", default="data/synthetic", help="output folder (replaced if it exists)")
    p.add_argument("--n-train", type=int, default=20000, help="training images (each gives a caption, "
                   "an SFT question, an OCR sample and a chart)")
    p.add_argument("--n-val", type=int, default=1000, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="square image side in pixels")
    args = p.parse_args()
    if os.path.exists(args.out_dir):
        shutil.rmtree(args.out_dir)
    generate(args.out_dir, args.n_train, args.n_val, args.seed, args.image_size)
    print(f"wrote {args.out_dir}")
