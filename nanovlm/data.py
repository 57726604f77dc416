"""
Data: the dataset formats people already have, read as they are, turned into model inputs.

Three record formats, in a JSON list or in JSONL (one record a line), detected per record:

    LLaVA          {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nDescribe it."},
                                                         {"from": "gpt", "value": "A cat."}]}
                   (LLaVA-CC3M-Pretrain-595K, LLaVA-Instruct; "image" absent = text only, or a list)
    role/content   {"images": ["a.jpg"], "conversations": [{"role": "user", "content": "..."}, ...]}
                   (minimind-v, Chinese-LLaVA; "messages" also accepted; <image> anywhere in the text)
    OCR            {"query": "What is written?", "response": "¥12.50", "image_path": "a.png"}
                   (becomes user "<image>\\n{query}" / assistant "{response}" unless the query has <image>)

Each becomes one normalised sample; unknown keys (qtype, solution, id, ...) are passed through:

    {"images": [absolute paths], "messages": [{"role", "content"}], "where": "file.jsonl:LINE", ...}

Relative image paths are resolved against --image-root, else the data file's folder. Everything is checked
when a run starts, before the first step, so no bad sample surfaces at step 10,000 of a GPU job. Bad input is
an error naming file:line and what is wrong, every bad record of a file counted in one line: bytes that are
not UTF-8, malformed JSON, a single JSON object instead of a list, text after a list, an unknown format or
role, turns out of order (an optional system turn, then user and assistant alternating, ending with the
assistant: a conversation with no answer trains nothing), <image> tags that do not match the images, an image
that is missing, unreadable or of an unsupported pixel mode (its header is opened, nothing decoded),
chat-control tokens typed in the text (tokenizer.py), malformed <num> markup, an empty file, a mixing weight
that rounds a file to no samples. Nothing is skipped silently. Only an image corrupt past its header is found
late, when __getitem__ decodes it (decoding 595K images up front would take an hour).

Several datasets are mixed with weights, `--data a.jsonl:2 b.json:1`: weights are sampling
proportions (here 2/3 of the mixture comes from a.jsonl, repeating it if it is short).

VLMDataset tokenizes with the chat template (tokenizer.py) and loads pixels with the model's image processor;
collate right-pads a batch. The processor is where the two model families differ: the SigLIP VLM squashes every
image to one size worth a fixed number of tokens (siglip.SiglipImages: pixel_values (n, 3, H, W)), Qwen2.5-VL
keeps each image near its own size, worth as many tokens as its size gives (qwen2_5_vl_processor.Qwen25VLImages:
patch rows (sum t*h*w, 1176) and image_grid_thw (n, 3)). Either way a sample's images are a dict of tensors that
concatenate along dim 0, and the chat template writes each image's own count of pads. Samples are never
truncated: cutting through
the image tokens or the answer would teach garbage, so an over-long sample is an error (or, with
drop_long=True, dropped and counted) decided at construction, so indices never change while training; the
construction prints one line per data file: samples, dropped, why.
The length scan is cheap: the chats are tokenized in one Rust encode_batch call with a single pad per image
(every image costs exactly its image tokens + 2 tokens) and the system turn counted once, paid once at start-up
(Qwen2.5-VL's counts need each image's size: one header read per distinct image).
The real tokenization happens lazily in __getitem__, inside the DataLoader workers.

Numbers written `<num><v>` (numeric.py) are parsed at construction, in every turn (user and assistant), so
malformed markup is an error naming the sample before training starts. With numeric=True each becomes the
`<num>` token and its value goes to `num_values` (one float per `<num>` token, in token order; collate
concatenates them in reading order, as the VLM expects); with numeric=False it is written as plain digits.
"""

import json
import math
import os
import random
import re

import torch
from PIL import Image, UnidentifiedImageError

from nanovlm.attention import Packing
from nanovlm.numeric import split_numbers
from nanovlm.siglip import IMAGE_MODES
from nanovlm.tokenizer import DEFAULT_SYSTEM, IMAGE_TAG

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CONSUMED = {"image", "images", "image_path", "conversations", "messages", "query", "response"}
WHITESPACE = re.compile(r"\s*")

# -----------------------------------------------------------------------------
# reading files


def read_records(path):
    """Yield (line, record) from a JSON list or a JSONL file (decided by the first character)."""
    text = read_text(path)
    pos = WHITESPACE.match(text).end()
    if text[pos:pos + 1] != "[":   # JSONL
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    single_json_value(path, text)   # a pretty-printed object reads as a broken first line
                    raise ValueError(f"{path}:{i}: malformed JSON line: {e.msg} (column {e.colno})") from None
        return
    # A JSON list, decoded one element at a time so each record knows the line it starts on.
    decoder, line, last = json.JSONDecoder(), 1, 0
    pos = WHITESPACE.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        line, last = line + text.count("\n", last, pos), pos
        yield line, record
        pos = WHITESPACE.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = WHITESPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            lineno = line + text.count("\n", last, pos)
            raise ValueError(f"{path}:{lineno}: malformed JSON: expected ',' or ']' after a record")
    rest = WHITESPACE.match(text, pos + 1).end()
    if rest < len(text):   # json.load would refuse this too; a list that stops early would lose the rest
        lineno = 1 + text.count("\n", 0, rest)
        raise ValueError(f"{path}:{lineno}: text after the JSON list's closing ']' (two lists one after the other?): "
                         "merge them into one list, or write JSONL (one record a line)")


def read_text(path):
    """The file as text; bytes that are not UTF-8 are an error naming the line (a leading BOM is fine)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: byte 0x{data[e.start]:02x} (column {column}) is not UTF-8: "
                         "save the file as UTF-8") from None


def single_json_value(path, text):
    """Raise a clear error if the whole file is one JSON value (typically a pretty-printed object), not a list."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    what = (f"a single JSON object (keys {sorted(value)[:6]})" if isinstance(value, dict)
            else f"a single JSON {type(value).__name__}")
    raise ValueError(f"{path}:1: the file is {what}; expected a JSON list of records, or JSONL (one record a "
                     "line). If the records are under one key, save that list on its own")


def check_roles(messages, where):
    """A conversation is an optional system turn, then user and assistant turns alternating, starting with the
    user and ending with the assistant: anything else would train on the wrong text, or on nothing at all."""
    k0 = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) == k0:
        raise ValueError(f"{where}: the conversation has no user or assistant turn")
    for k, m in enumerate(messages[k0:], k0):
        want = "user" if (k - k0) % 2 == 0 else "assistant"
        if m["role"] != want:
            first = "; only the first turn may be the system prompt" if m["role"] == "system" else ""
            raise ValueError(f"{where}: turn {k} has role {m['role']!r} where {want!r} belongs (turns must "
                             f"alternate user, assistant, starting with the user{first})")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation ends on a user turn (turn {len(messages) - 1}): "
                         "it needs an assistant answer, the text that is trained")


def normalise(record, where, base_dir):
    """One record in any of the three formats -> a normalised sample (see the module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if turns is not None:
        images = record.get("images", record.get("image"))
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'conversations' must be a list of turns")
        messages = []
        for k, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ValueError(f"{where}: turn {k} is not an object: {t!r}")
            role, content = (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))
            if role not in ROLES:
                raise ValueError(f"{where}: turn {k} has unknown role {role!r} "
                                 f"(expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise ValueError(f"{where}: turn {k} has no text content")
            messages.append({"role": ROLES[role], "content": content})
    elif "query" in record and "response" in record:
        images = record.get("image_path", record.get("images", record.get("image")))
        n = 1 if isinstance(images, str) else len(images or [])
        query = record["query"] if IMAGE_TAG in record["query"] else IMAGE_TAG * n + "\n" * (n > 0) + record["query"]
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": str(record["response"])}]
    else:
        raise ValueError(f"{where}: unknown record format with keys {sorted(record)}; expected "
                         "'conversations' (LLaVA or role/content) or 'query'+'response' (OCR)")
    check_roles(messages, where)

    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: images must be a path or a list of paths, got {images!r}")
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if n_tags != len(images):
        raise ValueError(f"{where}: {n_tags} {IMAGE_TAG} tag(s) in the text but {len(images)} image(s)")
    paths = [os.path.abspath(os.path.join(base_dir, p)) for p in images]
    extra = {k: v for k, v in record.items() if k not in CONSUMED}
    return {**extra, "images": paths, "messages": messages, "where": where}


def check_image(path, where):
    """Open the image's header (nothing decoded) so a missing, unreadable or unsupported image is
    found before training starts. A file corrupt past its header is found when a batch decodes it."""
    try:
        with Image.open(path) as image:
            mode = image.mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from None
    if mode not in IMAGE_MODES:
        raise ValueError(f"{where}: image {path} has pixel mode {mode!r}, which is not supported: convert it to RGB")


def load_dataset(path, image_root=None, check_images=True):
    """Every record of one file, normalised. Every record is checked (format, roles, <image> tags, each image's
    header) and all bad ones are reported together: the first by file:line, then how many more.
    check_images=False skips opening the images (one header read per image: seconds for 100K local files, but
    slow on a network file system)."""
    base_dir = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    samples, bad, checked = [], [], set()
    for line, record in read_records(path):
        where = f"{path}:{line}"
        try:
            sample = normalise(record, where, base_dir)
            for p in sample["images"] if check_images else ():
                if p not in checked:
                    check_image(p, where)
                    checked.add(p)
            samples.append(sample)
        except (ValueError, FileNotFoundError) as e:
            bad.append((line, e))
    if bad:
        first, lines = bad[0][1], [str(n) for n, _ in bad[1:6]] + (["..."] if len(bad) > 6 else [])
        more = f" (and {len(bad) - 1} more bad record(s) in {path}, line {', '.join(lines)})" if len(bad) > 1 else ""
        raise type(first)(f"{first}{more}")
    if not samples:
        raise ValueError(f"{path}: no records (an empty file or an empty list)")
    return samples


def parse_data_spec(spec):
    """'a.jsonl:2 b.json:1' (or a list of such strings, or commas) -> [("a.jsonl", 2.0), ("b.json", 1.0)].
    A missing weight is 1. Only a trailing ':number' is a weight, so 'C:/data/x.json' stays a path; a trailing
    ':word' (no slash) is a mistyped weight, unless a file of that very name exists."""
    items = spec.replace(",", " ").split() if isinstance(spec, str) else [s for x in spec for s in
                                                                          x.replace(",", " ").split()]
    out = []
    for item in items:
        path, colon, w = item.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            if colon and path and not any(c in w for c in "/\\") and not os.path.exists(item):
                raise ValueError(f"bad --data item {item!r}: weight {w!r} is not a number "
                                 "(expected PATH or PATH:WEIGHT, e.g. a.jsonl:0.5)") from None
            path, weight = item, 1.0
        if not path or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"bad --data item {item!r}: expected PATH or PATH:WEIGHT with WEIGHT a finite number > 0")
        out.append((path, weight))
    if not out:
        raise ValueError("empty data spec: give at least one data file")
    return out


def mix(datasets, weights, total=None, seed=0, names=None):
    """Draw round(total * w_i / sum(w)) samples from dataset i (total defaults to all samples):
    whole shuffled passes, then a shuffled remainder, so a short dataset with a big weight repeats
    evenly and a long one with a small weight is subsampled without repeats. Returns one shuffled list.
    A weight so small that its dataset rounds to 0 samples is an error naming it (names: one per dataset)."""
    rng = random.Random(seed)
    total = sum(len(d) for d in datasets) if total is None else total
    names = names or [f"dataset {i}" for i in range(len(datasets))]
    out = []
    for data, w, name in zip(datasets, weights, names):
        n = round(total * w / sum(weights))
        if n == 0 and data:
            raise ValueError(f"{name}: weight {w:g} of {sum(weights):g} in total gives it 0 of the {total} samples "
                             "in the mix: raise its weight or leave it out")
        while n > 0 and data:
            order = rng.sample(range(len(data)), len(data))[:n]
            out += [data[i] for i in order]
            n -= len(order)
    rng.shuffle(out)
    return out


def load_data(spec, image_root=None, seed=0, total=None, check_images=True):
    """The --data flag end to end: parse, load each file, mix by weight (one file: kept as is)."""
    parsed = parse_data_spec(spec)
    datasets = [load_dataset(p, image_root, check_images) for p, _ in parsed]
    if len(datasets) == 1 and total is None:
        return datasets[0]
    return mix(datasets, [w for _, w in parsed], total, seed, names=[p for p, _ in parsed])


def source(where):
    """'data/a.jsonl:12' -> 'data/a.jsonl' (the file a sample came from)."""
    return where.rpartition(":")[0] or where


def fit_lengths(samples, lengths, max_length, drop_long=False, limit=None, verbose=True):
    """Indices of the samples whose length (tokens) fits max_length. A longer sample is an error, or with drop_long
    dropped and counted; verbose prints one line per data file (samples, dropped, why). No sample left is an
    error naming the files. limit: how to name the limit in messages (default "max_length=N")."""
    limit = limit or f"max_length={max_length}"
    long = [(s["where"], n) for s, n in zip(samples, lengths) if n > max_length]
    report = ", ".join(f"{w} ({n} tokens)" for w, n in long[:5]) + (", ..." if len(long) > 5 else "")
    if long and not drop_long:
        raise ValueError(f"{len(long)} sample(s) longer than {limit}: {report}. "
                         "Raise the limit or pass drop_long=True (--drop-long) to drop them.")
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    files = list(dict.fromkeys(source(s["where"]) for s in samples))
    if not keep:
        raise ValueError(f"no samples left in {', '.join(files) or 'the data'}: all {len(samples)} are longer than "
                         f"{limit} (first {report})" if samples else "no samples")
    if verbose:
        for f in files:
            mine = [s for s in samples if source(s["where"]) == f]
            dropped = [(w, n) for w, n in long if source(w) == f]
            why = f": longer than {limit}, first {dropped[0][0]} ({dropped[0][1]} tokens)" if dropped else ""
            records = len(set(s["where"] for s in mine))
            print(f"data {f}: {len(mine) - len(dropped)} samples ({records} record{'s' * (records != 1)}), "
                  f"{len(dropped)} dropped{why}")
    return keep

# -----------------------------------------------------------------------------
# images, tokens, batches


def load_images(paths, processor, where):
    """A sample's images, decoded and turned into model inputs by the model's image processor (`images`:
    siglip.SiglipImages or qwen2_5_vl_processor.Qwen25VLImages): a dict of tensors whose rows follow the
    images' order. A missing, truncated or unreadable image is an error naming the sample and the file."""
    parts = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()   # decode now, so a truncated file fails here with its name
                parts.append(processor([image]))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:   # ValueError: the processor's
            raise ValueError(f"{where}: cannot read image {path}: {e}") from None
    return cat_images(parts) if parts else processor([])


def cat_images(parts):
    """Image inputs of several samples (dicts of tensors) -> one dict, each tensor concatenated along dim 0 in
    the given order: the order in which the model fills the image-pad tokens (reading order)."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def image_token_counts(samples, processor):
    """LM tokens of every image of every sample (one list per sample), as the processor counts them; an image
    the processor refuses (Qwen2.5-VL: an aspect ratio over 200) is an error naming the sample."""
    counts, known = [], {}
    for s in samples:
        try:
            counts.append([known[p] if p in known else known.setdefault(p, processor.image_tokens(p))
                           for p in s["images"]])
        except (OSError, ValueError) as e:
            raise ValueError(f"{s['where']}: {e}") from None
    return counts


class VLMDataset(torch.utils.data.Dataset):
    def __init__(self, samples, tokenizer, images, max_length, drop_long=False, system=DEFAULT_SYSTEM,
                 numeric=False, verbose=True):
        """images: the model's image processor (model.image_processor()): it turns a sample's images into
        model inputs and says how many LM tokens each is worth. Checks every sample before training starts
        (roles, <image> tags, <num> markup, chat-control text, length; the files' records and image headers were
        checked by load_dataset) and prints one line per data file (verbose). An empty dataset, before or after
        dropping, is an error naming the files."""
        self.tokenizer, self.images, self.system, self.numeric = tokenizer, images, system, numeric
        if not samples:
            raise ValueError("no samples: the dataset is empty")
        for s in samples:  # hand-built samples get the same checks as loaded ones
            check_roles(s["messages"], s["where"])
            n_tags = sum(m["content"].count(IMAGE_TAG) for m in s["messages"])
            if n_tags != len(s["images"]):
                raise ValueError(f"{s['where']}: {n_tags} {IMAGE_TAG} tag(s) but {len(s['images'])} image(s)")
        samples = [self.parse_numbers(s) for s in samples]
        counts = image_token_counts(samples, images)
        # chat_lengths renders every chat, refusing chat-control tokens in the text (template injection)
        lengths = tokenizer.chat_lengths([s["messages"] for s in samples], counts, system,
                                         wheres=[s["where"] for s in samples])
        keep = fit_lengths(samples, lengths, max_length, drop_long, verbose=verbose)
        self.n_dropped = len(samples) - len(keep)
        self.samples = [samples[i] for i in keep]
        self.image_tokens = [counts[i] for i in keep]   # per sample, per image
        self.lengths = [lengths[i] for i in keep]   # for length-grouped batching, if wanted

    def __len__(self):
        return len(self.samples)

    def parse_numbers(self, s):
        """<num><v> markup in every turn -> <num> tokens + s["num_values"] (numeric), or plain digits."""
        if "<num>" not in "".join(m["content"] for m in s["messages"]):
            return {**s, "num_values": []}
        messages, values = split_numbers(s["messages"], self.numeric, s["where"])
        return {**s, "messages": messages, "num_values": values}

    def __getitem__(self, i):
        s = self.samples[i]
        ids, labels = self.tokenizer.encode_chat(s["messages"], self.image_tokens[i], system=self.system,
                                                 where=s["where"])
        item = dict(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                    images=load_images(s["images"], self.images, s["where"]), where=s["where"])
        if self.numeric:
            item["num_values"] = torch.tensor(s["num_values"], dtype=torch.float32)      # (n_num,)
            if ids.count(self.tokenizer.num) != len(s["num_values"]):
                raise ValueError(f"{s['where']}: {ids.count(self.tokenizer.num)} <num> token(s) after tokenizing "
                                 f"but {len(s['num_values'])} value(s): is there a <num> in the system prompt?")
        return item


def collate(batch, pad_id):
    """Right-pad to the longest sample, one sample per row. Images of all samples are concatenated in order:
    the VLM fills the image_pad slots of sample b with the next n_images[b] images."""
    out = _fill_rows(batch, [[i] for i in range(len(batch))], pad_id)
    out["attention_mask"] = out["attention_mask"].bool()   # (B, T), True = real token
    return out


def pack(batch, pad_id, max_length):
    """Like collate, but several samples share a row (up to max_length tokens) instead of each padding to the
    longest: a batch of short and long samples then wastes little compute on padding. attention_mask numbers
    the samples of a row 1, 2, 3, ... (0 = padding); the LM keeps them apart (block-diagonal attention,
    positions restarting at each sample), so the loss and its gradient are those of the padded batch.
    Rows are filled first-fit, longest sample first."""
    rows, room = [], []
    for i in sorted(range(len(batch)), key=lambda i: -len(batch[i]["input_ids"])):
        n = len(batch[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"{batch[i]['where']}: {n} tokens do not fit a packed row of max_length={max_length}")
        r = next((r for r in range(len(rows)) if room[r] >= n), len(rows))   # the first row it fits, or a new one
        if r == len(rows):
            rows.append([])
            room.append(max_length)
        rows[r].append(i)
        room[r] -= n
    return _fill_rows(batch, rows, pad_id)


def _fill_rows(batch, rows, pad_id):
    """rows: lists of sample indices, each row's samples laid one after another. attention_mask (B, T) long
    numbers them 1, 2, ... in their row, 0 = padding; packing (attention.Packing) says the same in the form
    attention uses (positions within each sample, cu_seqlens), computed here so no layer derives it. Images and
    <num> values follow the reading order (row by row, left to right), the order in which the VLM fills
    image-pad slots and <num> tokens."""
    lengths = [sum(len(batch[i]["input_ids"]) for i in row) for row in rows]
    B, T = len(rows), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            n = len(batch[i]["input_ids"])
            input_ids[r, t:t + n], labels[r, t:t + n] = batch[i]["input_ids"], batch[i]["labels"]
            attention_mask[r, t:t + n] = k + 1
            t += n
    read = [batch[i] for row in rows for i in row]
    out = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
               packing=Packing.from_mask(attention_mask),   # positions and cu_seqlens, here on the CPU, once
               **cat_images([b["images"] for b in read]))   # e.g. pixel_values (sum n_img, 3, H, W), maybe (0, ...)
    if "num_values" in batch[0]:   # the numeric head's values, one per <num> token in reading order
        out["num_values"] = torch.cat([b["num_values"] for b in read])      # (sum n_num,)
    out["where"] = [b["where"] for b in read]   # the samples' names, for errors; not a model input
    return out
