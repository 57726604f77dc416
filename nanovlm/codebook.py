"""Images as token sequences: a k-means patch codebook, the vocabulary, and the JSONL data train_gpt.py reads.

An image is cut into small patches (patch x patch pixels, every `stride` pixels); each patch is replaced by the
id of its nearest k-means centre, so an 8x8 digit becomes a short "sentence" of codes. One sample per line:

    {"tokens": "<IMG> c_17 c_203 ... </IMG> <CLS> <CLS_3> <EOS>"}

Vocabulary (vocab.json, token -> id), ids fixed so every run and every dataset agrees:
    0 <PAD>  1 <IMG>  2 </IMG>  3 <CLS>  4 <EOS>  5.. <CLS_0>..<CLS_{n-1}> (n >= 10)  then c_0..c_{K-1}

prepare() builds a data directory from scikit-learn's 1797 handwritten digits (or a folder-per-class image
directory): train/val/test.jsonl (training images also as randomly turned and moved copies, augment()),
vocab.json, codebook.npz (centres + patch geometry, fitted on train only), images.npz (the same splits as
pixels, for a classical baseline) and meta.json. save_tokenizer() writes the vocabulary for transformers.

Why 4x4 patches every 2 pixels (9 codes per 8x8 digit): a code then stands for a piece of stroke, not a few
pixels of one, and short sequences train fast (the probes behind it: docs/experiments.md, "Small GPT").
"""

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

SPECIAL = ["<PAD>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
PAD, IMG, IMG_END, CLS, EOS = range(len(SPECIAL))
TAIL_LEN = 4  # </IMG> <CLS> <CLS_k> <EOS>: never truncated away
HF_TOKEN_IDS = {"bos_token_id": IMG, "eos_token_id": EOS, "pad_token_id": PAD}  # for GPT.save_hf's config.json


def build_vocab(codebook_size, n_classes=10):
    tokens = SPECIAL + [f"<CLS_{i}>" for i in range(max(10, n_classes))] + [f"c_{i}" for i in range(codebook_size)]
    return {t: i for i, t in enumerate(tokens)}


def class_token_ids(vocab):
    """Ids of <CLS_0>, <CLS_1>, ... in class order."""
    n = sum(1 for t in vocab if t.startswith("<CLS_"))
    return [vocab[f"<CLS_{i}>"] for i in range(n)]


def load_vocab(path):
    """vocab.json -> {token: id}, checked: one id per token, ids 0..N-1, the fixed special ids, <CLS_0>.. in order."""
    path = Path(path)
    try:
        vocab = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read vocabulary: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object {{token: integer id}}")
    by_id = {}
    for t, i in vocab.items():
        by_id.setdefault(i, []).append(t)
    shared = [(i, ts) for i, ts in sorted(by_id.items()) if len(ts) > 1]
    if shared:  # two tokens on one embedding row would be one token to the model
        i, ts = shared[0]
        raise ValueError(f"{path}: tokens {', '.join(map(repr, ts))} share id {i} ({len(shared)} ids are shared); "
                         "every token needs its own id")
    if sorted(by_id) != list(range(len(vocab))):
        raise ValueError(f"{path}: ids must be 0..{len(vocab) - 1} (one embedding row each), "
                         f"got {min(by_id)}..{max(by_id)}")
    for i, t in enumerate(SPECIAL):
        if vocab.get(t) != i:
            raise ValueError(f"{path}: expected {t} to have id {i}, got {vocab.get(t)}")
    labels = [t for t in vocab if t.startswith("<CLS_")]
    missing = [f"<CLS_{k}>" for k in range(len(labels)) if f"<CLS_{k}>" not in vocab]
    if missing:
        raise ValueError(f"{path}: label tokens must be <CLS_0>..<CLS_{len(labels) - 1}>, missing {missing[:3]}")
    return vocab


def save_tokenizer(vocab, out_dir):
    """Write vocab as tokenizer.json (+ tokenizer_config.json) for the Hugging Face tokenizers / transformers.

    A WordLevel model: the text is split on whitespace and each piece looked up in vocab, exactly like encode().
    A piece not in vocab is an error there too (no unknown token). The five structural tokens are marked
    special, so decoding with skip_special_tokens keeps only codes and labels.
    """
    tok = Tokenizer(models.WordLevel(vocab))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<IMG>", "eos_token": "<EOS>",
              "pad_token": "<PAD>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------------------------------------------
# Patches and k-means


def extract_patches(images, patch, stride):
    """(N, H, W) -> (N, P, patch*patch), P = rows * cols of patch positions in raster order."""
    N, H, W = images.shape
    if patch > min(H, W):
        raise ValueError(f"patch {patch} is larger than the {H}x{W} images")
    rows = range(0, H - patch + 1, stride)
    cols = range(0, W - patch + 1, stride)
    out = [images[:, r:r + patch, c:c + patch].reshape(N, -1) for r in rows for c in cols]
    return np.stack(out, axis=1)


def _sq_dists(x, centres):
    """(N, D), (K, D) -> (N, K) squared Euclidean distances, via |x|^2 - 2 x.c + |c|^2 (no (N, K, D) tensor)."""
    d = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0)


def kmeans(x, k, seed=0, iters=30):
    """Lloyd's k-means with k-means++ seeding; deterministic for a seed. x: (N, D) -> centres (K, D) float32."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    closest = _sq_dists(x, centres[:1])[:, 0]
    for i in range(1, k):
        # Next centre drawn with probability proportional to its squared distance to the chosen ones; if every
        # point already coincides with a centre (fewer distinct points than k), draw uniformly.
        total = closest.sum()
        j = rng.choice(len(x), p=closest / total) if total > 0 else rng.integers(len(x))
        centres[i] = x[j]
        closest = np.minimum(closest, ((x - centres[i]) ** 2).sum(1))
    for _ in range(iters):
        assign = _sq_dists(x, centres).argmin(1)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        moved = counts > 0  # an empty cluster keeps its centre
        new = centres.copy()
        new[moved] = sums[moved] / counts[moved, None]
        if np.allclose(new, centres):
            break
        centres = new
    return centres.astype(np.float32)


def quantize(patches, centres):
    """(N, P, D) -> (N, P) id of the nearest centre (ties go to the lower id)."""
    N, P, D = patches.shape
    return _sq_dists(patches.reshape(-1, D).astype(np.float64), centres.astype(np.float64)).argmin(1).reshape(N, P)


# --------------------------------------------------------------------------------------------------------------
# Sequences: encode, read, truncate, collate


def sequence_text(codes, label):
    return " ".join(["<IMG>", *(f"c_{c}" for c in codes), "</IMG>", "<CLS>", f"<CLS_{label}>", "<EOS>"])


def encode(text, vocab, where="input"):
    """'<IMG> c_1 ...' -> ids; an unknown token is an error naming `where` (file:line)."""
    ids = []
    for tok in text.split():
        if tok not in vocab:
            raise ValueError(f"{where}: unknown token {tok!r} (not in the vocabulary of {len(vocab)} tokens)")
        ids.append(vocab[tok])
    return ids


def read_jsonl(path, vocab):
    """One list of ids per line of {"tokens": "..."}; malformed lines raise naming file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    labels = set(class_token_ids(vocab))
    not_code = set(range(len(SPECIAL))) | labels
    itos = {i: t for t, i in vocab.items()}
    seqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["tokens"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'tokens' string ({e})") from None
            ids = encode(text, vocab, f"{path}:{n}")
            if len(ids) < TAIL_LEN + 1 or ids[0] != IMG or ids[-TAIL_LEN] != IMG_END or ids[-TAIL_LEN + 1] != CLS \
                    or ids[-1] != EOS:
                raise ValueError(f"{path}:{n}: expected '<IMG> ... </IMG> <CLS> <CLS_k> <EOS>', got {text[:80]!r}")
            if ids[-2] not in labels:  # the answer the model learns to give at <CLS>
                raise ValueError(f"{path}:{n}: the token before <EOS> must be a label <CLS_k>, got {itos[ids[-2]]!r}")
            inside = [i for i in ids[1:-TAIL_LEN] if i in not_code]
            if inside:
                raise ValueError(f"{path}:{n}: between <IMG> and </IMG> only image codes may appear, "
                                 f"got {itos[inside[0]]!r}")
            seqs.append(ids)
    if not seqs:
        raise ValueError(f"{path}: no samples")
    return seqs


def truncate(ids, max_length):
    """Cut image codes from the end of the image so that len <= max_length, keeping <IMG> and the label tail."""
    if max_length < TAIL_LEN + 1:
        raise ValueError(f"max_length {max_length} is too short: need <IMG> plus the {TAIL_LEN}-token tail")
    if len(ids) <= max_length:
        return list(ids)
    return list(ids[:max_length - TAIL_LEN]) + list(ids[-TAIL_LEN:])


def collate(seqs, max_length):
    """Next-token pairs: inputs = seq[:-1], targets = seq[1:], right-padded with <PAD> / -100.

    Returns input_ids, targets, both (B, T) long with T = longest truncated sequence - 1.
    """
    seqs = [truncate(s, max_length) for s in seqs]
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), PAD, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        inputs[b, :len(s) - 1] = torch.tensor(s[:-1])
        targets[b, :len(s) - 1] = torch.tensor(s[1:])
    return inputs, targets


def class_predictions(logits, input_ids, targets, class_ids):
    """Predicted and true class at the <CLS> position, the argmax taken over the label tokens only.

    logits: (B, T, V) for input_ids (B, T); the logit at <CLS> predicts <CLS_k>. Returns (pred, true), (B,) each,
    as class indices (0..n-1).
    """
    is_cls = input_ids == CLS                                              # (B, T)
    if not bool(is_cls.any(1).all()):
        raise ValueError("a sequence has no <CLS> token")
    pos = is_cls.int().argmax(1)                                           # (B,) first <CLS>
    rows = torch.arange(len(pos), device=pos.device)
    ids = torch.as_tensor(class_ids, device=logits.device)
    pred = logits[rows, pos][:, ids].argmax(-1)                            # (B,)
    lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=logits.device)
    lookup[ids] = torch.arange(len(ids), device=logits.device)
    true = lookup[targets[rows, pos].clamp(min=0)]
    return pred, true


# --------------------------------------------------------------------------------------------------------------
# Prepare a data directory


def load_digits_images():
    """scikit-learn's 8x8 digits as (N, 8, 8) floats in [0, 1], labels, class names."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset ships with scikit-learn: pip install scikit-learn "
                          "(or pass --data with a folder-per-class image directory)") from None
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64), [str(i) for i in range(10)]


def load_image_folder(root, size):
    """root/<class>/<image>: grayscale, resized to size x size, [0, 1]. Classes sorted by folder name."""
    from PIL import Image
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            try:
                img = Image.open(f).convert("L").resize((size, size), Image.BILINEAR)
            except OSError as e:
                raise ValueError(f"{f}: not a readable image ({e})") from None
            images.append(np.asarray(img, dtype=np.float32) / 255.0)
            labels.append(k)
    return np.stack(images), np.array(labels, dtype=np.int64), classes


def split_indices(n, seed, val_frac=0.15, test_frac=0.15):
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test_frac), round(n * val_frac)
    return {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}


def affine(images, angle, dy, dx):
    """Each image turned by angle[i] degrees about its centre and moved by (dy[i], dx[i]) pixels.

    images (N, H, W); angle, dy, dx (N,) each. Bilinear: every output pixel reads the 4 input pixels around
    the point it comes from (the inverse rotation of its offset from the moved centre); zeros outside.
    """
    N, H, W = images.shape
    a = np.radians(np.asarray(angle, dtype=np.float64))[:, None, None]                # (N, 1, 1)
    cos, sin = np.cos(a), np.sin(a)
    ry = np.arange(H)[None, :, None] - (H - 1) / 2 - np.asarray(dy, dtype=np.float64)[:, None, None]  # (N, H, 1)
    rx = np.arange(W)[None, None, :] - (W - 1) / 2 - np.asarray(dx, dtype=np.float64)[:, None, None]  # (N, 1, W)
    sy = cos * ry + sin * rx + (H - 1) / 2                                             # (N, H, W) source row
    sx = -sin * ry + cos * rx + (W - 1) / 2                                            # (N, H, W) source column
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    n = np.arange(N)[:, None, None]
    out = np.zeros((N, H, W))
    for oy, ox, w in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 1, fy * fx)):
        yi, xi = y0 + oy, x0 + ox
        inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        out += w * inside * images[n, yi.clip(0, H - 1), xi.clip(0, W - 1)]
    return out.astype(images.dtype)


def augment(images, copies, rotate, shift, seed):
    """The images, then copies - 1 randomly moved versions of them (angle in +-rotate degrees, shifts in +-shift
    pixels, uniform). A digit turned a little or drawn a pixel off is the same digit."""
    rng = np.random.default_rng(seed)
    out = [images]
    for _ in range(copies - 1):
        u = rng.uniform(-1, 1, (3, len(images)))
        out.append(affine(images, rotate * u[0], shift * u[1], shift * u[2]))
    return np.concatenate(out)                                                          # (copies * N, H, W)


def prepare(out_dir, source="digits", codebook_size=512, patch=4, stride=2, image_size=16, seed=0, copies=1,
            rotate=0.0, shift=0.0):
    """Build out_dir from `source` ("digits" or a folder-per-class directory). Returns out_dir.

    copies > 1 writes each training image that many times, all but the first randomly turned (+-rotate degrees)
    and moved (+-shift pixels) before quantising (augment()). val/test are never augmented.
    """
    out_dir = Path(out_dir)
    if source == "digits":
        images, labels, classes = load_digits_images()
    else:
        images, labels, classes = load_image_folder(source, image_size)
    splits = split_indices(len(images), seed)
    # The codebook sees training patches only, so val/test stay unseen.
    train_patches = extract_patches(images[splits["train"]], patch, stride)
    centres = kmeans(train_patches.reshape(-1, train_patches.shape[-1]), codebook_size, seed)
    vocab = build_vocab(codebook_size, len(classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, idx in splits.items():
        x, y = images[idx], labels[idx]
        if name == "train":
            x, y = augment(x, copies, rotate, shift, seed), np.tile(y, copies)
        codes = quantize(extract_patches(x, patch, stride), centres)
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for c, label in zip(codes, y):
                f.write(json.dumps({"tokens": sequence_text(c.tolist(), int(label))}) + "\n")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0))
    np.savez(out_dir / "codebook.npz", centres=centres, patch=patch, stride=stride)
    np.savez(out_dir / "images.npz", **{f"x_{k}": images[v] for k, v in splits.items()},
             **{f"y_{k}": labels[v] for k, v in splits.items()})
    meta = {"source": str(source), "classes": classes, "codebook_size": codebook_size, "patch": patch,
            "stride": stride, "copies": copies, "rotate": rotate, "shift": shift, "seed": seed,
            "image_shape": list(images.shape[1:]), "sizes": {k: len(v) for k, v in splits.items()}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir
