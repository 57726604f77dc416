"""Speed of our models against transformers' at the same config, dtype, weights and machine, in one run.

    python benchmarks/bench_models.py                      # fp32, 4-layer Qwen2.5-0.5B shape, all cores
    python benchmarks/bench_models.py --layers 24 --dtype bfloat16 --device cuda
    python benchmarks/bench_models.py --only siglip --vit-batch 32
    python benchmarks/bench_models.py --help

Three measurements of ours vs transformers (ratio = our throughput / theirs; > 1 means we are faster):
  qwen2-train   forward + backward tokens/s: loss = cross-entropy of next-token logits, .backward(), no optimizer
                (ours: nanovlm.qwen2.Qwen2; theirs: Qwen2ForCausalLM with attn_implementation="sdpa")
  qwen2-decode  greedy decoding new tokens/s with a KV cache, prefill included
                (ours: prefill + one token at a time with nanovlm.attention.KVCache;
                 theirs: generate(do_sample=False, max_new_tokens=N, min_new_tokens=N));
                with --compile also our decode step through torch.compile (its compile time reported apart)
  siglip        vision tower forward images/s under no_grad (ours: SiglipViT; theirs: SiglipVisionModel)
and two of our own paths against the plain ones they replace:
  qwen2-packed  the decoder on packed rows (samples of random lengths, data.pack): each packed-attention backend
                that runs here (flex, flash) against the dense (B, T, T) block-diagonal mask given to SDPA.
                Forward + backward on CUDA; forward only on the CPU (FlexAttention has no CPU backward)
  chunked-ce    the loss over --ce-tokens labelled tokens at vocabulary 151,936: chunked_ce.linear_cross_entropy
                against F.cross_entropy of the full logits, forward + backward: time, and peak bytes of tensors
                alive (PeakMemory: tensor accounting, the same on CPU and GPU)

The Qwen2 model has the Qwen2.5-0.5B shape (hidden 896, 14 heads / 2 kv heads, MLP 4864, vocab 151936, tied
embeddings, rope_theta 1e6) with --layers layers (default 4, so it runs in minutes on a laptop CPU); SigLIP has
the siglip-base-patch16-224 shape. Weights are random: transformers builds the model, it is saved with
save_pretrained and both sides load that directory, so the weights are identical. Before timing, the outputs
are compared (logits, generated tokens, hidden states) so we know both sides compute the same function.

Timing: warm-up calls first, then --repeats calls of each side, alternating ours/theirs so that drift (thermal,
other processes) hits both alike; the median is reported. On CUDA the device is synchronised around each call.
Throughput is by wall clock; the table also gives the ratio of CPU time this process spent per call, which stays
meaningful when other programs share the machine (wall-clock ratios then get noisy).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
import transformers  # benchmarks compare against it; nanovlm/ never imports it
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from nanovlm.attention import HAVE_FLASH, HAVE_FLEX, KVCache
from nanovlm.chunked_ce import linear_cross_entropy
from nanovlm.data import pack
from nanovlm.qwen2 import Qwen2
from nanovlm.siglip import SiglipViT
from nanovlm.weights import config_dtype

DTYPES = ["bf16", "bfloat16", "float32", "fp32"]
BENCHES = ("qwen2-train", "qwen2-decode", "siglip", "qwen2-packed", "chunked-ce")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), help="which benchmarks to run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter and activation dtype")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each side (median reported)")
    p.add_argument("--layers", type=int, default=4, help="Qwen2 decoder layers (Qwen2.5-0.5B has 24)")
    p.add_argument("--train-batch", type=int, default=1, help="qwen2-train batch size")
    p.add_argument("--train-seq", type=int, default=256, help="qwen2-train sequence length")
    p.add_argument("--decode-batch", type=int, default=1, help="qwen2-decode batch size")
    p.add_argument("--prompt-len", type=int, default=32, help="qwen2-decode prompt length")
    p.add_argument("--new-tokens", type=int, default=32, help="qwen2-decode tokens generated per row")
    p.add_argument("--vit-batch", type=int, default=8, help="siglip images per forward")
    p.add_argument("--vit-layers", type=int, default=12, help="siglip layers (siglip-base has 12)")
    p.add_argument("--compile", action="store_true", help="qwen2-decode: also time a torch.compile'd decode step")
    p.add_argument("--packed-rows", type=int, default=2, help="qwen2-packed rows")
    p.add_argument("--packed-len", type=int, default=1024, help="qwen2-packed row length in tokens")
    p.add_argument("--ce-tokens", type=int, default=1024, help="chunked-ce labelled tokens")
    return p.parse_args(argv)


# ---- helpers ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns, device, warmup, repeats, before=None):
    """fns: {name: callable}. Calls each `warmup` times, then `repeats` timed rounds (ours, theirs, ours, ...)
    with the order flipped every round. `before(name)` runs untimed first. Returns {name: (median wall seconds,
    median CPU seconds of this process)}: CPU time is what the call cost even when other programs share the cores."""
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            if before is not None:
                before(n)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            sync(device)
            if r >= warmup:
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def result(name, unit, work, t, ours="ours", other="transformers"):
    """A table row: throughputs (work / median wall time) of two sides and their CPU-time ratio."""
    (wo, co), (wt, ct) = t[ours], t[other]
    return name, unit, work / wo, work / wt, ct / co, other


def randomize(model, std=0.2, seed=0):
    """Every parameter random, biases and norm weights too: the default init (bias 0, norm 1) hides bugs.
    (The tests use it too, through tests/conftest.py.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + centre)
    return model


class PeakMemory(TorchDispatchMode):
    """Tensor accounting, no GPU needed: inside `with PeakMemory() as m:`, every tensor storage an op creates is
    counted from its creation until it is freed (a weakref finalizer on the storage fires when the last tensor
    using it, autograd's saved tensors included, lets go); views and in-place results share an input's storage
    and are not new. m.peak is the most bytes alive at once. Tensors made before the block are not counted.
    (The tests use it too, through tests/conftest.py.)"""

    def __enter__(self):
        self.live = self.peak = 0
        self.sizes = {}
        return super().__enter__()

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.sizes and key not in inputs:   # new memory: not a view, not written in place
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def check_close(what, ours, theirs, dtype, names=("ours", "transformers")):
    """Assert the two outputs agree: 1e-4 (relative to the output scale) in fp32, 2e-2 in bf16."""
    ours, theirs = ours.float(), theirs.float()
    diff, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * max(scale, 1.0)
    print(f"  check {what}: max |{names[0]} - {names[1]}| = {diff:.2e} (output scale {scale:.2f}, "
          f"tolerance {tol:.1e})")
    assert diff <= tol, f"{what}: {names[0]} and {names[1]} disagree by {diff:.3e} > {tol:.1e}; not timing"


# ---- Qwen2 -----------------------------------------------------------------------------------------------------

def qwen2_pair(args, tmp, device, dtype):
    cfg = HFQwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                        max_position_embeddings=32768, tie_word_embeddings=True, attn_implementation="sdpa")
    randomize(Qwen2ForCausalLM(cfg), std=0.02, seed=args.seed).save_pretrained(tmp)  # fp32 on disk
    # Both load the same directory in the benchmark dtype (as a user would: transformers keeps inv_freq in fp32).
    theirs = Qwen2ForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device)
    ours = Qwen2.from_pretrained(tmp, dtype=dtype).to(device)
    return ours, theirs


def next_token_loss(logits, ids):
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1], in fp32 (as transformers' loss does)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def bench_qwen2_train(args, ours, theirs, device, dtype):
    B, T = args.train_batch, args.train_seq
    print(f"qwen2-train: forward + backward, batch {B} x {T} tokens")
    ids = torch.randint(0, 151936, (B, T), generator=torch.Generator().manual_seed(args.seed)).to(device)
    ours.train(), theirs.train()  # dropout is 0 in both; train mode is what a training step runs in
    with torch.no_grad():
        check_close("qwen2 logits", ours(ids), theirs(ids).logits, dtype)

    def step_ours():
        next_token_loss(ours(ids), ids).backward()

    def step_theirs():
        next_token_loss(theirs(ids).logits, ids).backward()

    # The same loss on the same logits for both sides (not transformers' labels= path), so only the models differ.
    models = {"ours": ours, "transformers": theirs}
    t = time_alternating({"ours": step_ours, "transformers": step_theirs}, device, args.warmup, args.repeats,
                         before=lambda n: models[n].zero_grad(set_to_none=True))
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    ours.eval(), theirs.eval()
    return result("qwen2 fwd+bwd", "tokens/s", B * T, t)


@torch.no_grad()
def greedy_ours(model, prompt, n_new, step=None):
    """Greedy decoding with a KV cache: one prefill over the prompt, then one token per forward.
    prompt (B, P) with no padding -> new tokens (B, n_new). step: a compiled decode_step, or None."""
    B, P = prompt.shape
    c = model.cfg
    cache = KVCache(c.num_hidden_layers, B, P + n_new, c.num_key_value_heads, c.head_dim,
                    dtype=model.embed_tokens.weight.dtype, device=prompt.device)
    h = model.hidden_states(prompt, cache=cache)[:, -1:]       # (B, 1, C): only the last position needs logits
    nxt = model.logits(h).argmax(-1)                           # (B, 1)
    out = [nxt]
    for _ in range(n_new - 1):
        nxt = (step or decode_step)(model, nxt, cache)
        out.append(nxt)
    return torch.cat(out, dim=1)


def decode_step(model, tok, cache):
    """(B, 1) token -> (B, 1) next greedy token; fixed shapes and no host reads, so torch.compile captures it whole."""
    return model.logits(model.hidden_states(tok, cache=cache)).argmax(-1)


@torch.no_grad()
def greedy_theirs(model, prompt, n_new):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def bench_qwen2_decode(args, ours, theirs, device, dtype):
    B, P, N = args.decode_batch, args.prompt_len, args.new_tokens
    print(f"qwen2-decode: greedy, batch {B}, prompt {P} tokens, {N} new tokens per row (prefill included)")
    prompt = torch.randint(0, 151936, (B, P), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    a, b = greedy_ours(ours, prompt, N), greedy_theirs(theirs, prompt, N)
    same = (a == b).all().item()
    print(f"  check greedy tokens: {'identical' if same else 'DIFFERENT'} ({int((a == b).sum())}/{a.numel()} equal)")
    if dtype == torch.float32:  # in bf16 rounding may flip a near-tie and the two continuations part ways
        assert same, "greedy tokens differ between ours and transformers in fp32; not timing"
    sides = {"ours": lambda: greedy_ours(ours, prompt, N), "transformers": lambda: greedy_theirs(theirs, prompt, N)}
    if args.compile:
        compiled = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
        t0 = time.perf_counter()
        same = bool((greedy_ours(ours, prompt, N, compiled) == a).all())
        print(f"  compile: first call {time.perf_counter() - t0:.1f} s (compiles the step); same tokens: {same}")
        sides["ours, compiled step"] = lambda: greedy_ours(ours, prompt, N, compiled)
    t = time_alternating(sides, device, args.warmup, args.repeats)
    rows = [result("qwen2 greedy decode", "new tokens/s", B * N, t)]
    if args.compile:
        rows += [result("qwen2 greedy decode, compiled step", "new tokens/s", B * N, t, "ours, compiled step"),
                 result("qwen2 greedy decode, compiled step", "new tokens/s", B * N, t, "ours, compiled step", "ours")]
    return rows


def packed_batch(args, device, vocab):
    """--packed-rows rows of --packed-len tokens packed (data.pack, first fit) from samples of random lengths."""
    g = torch.Generator().manual_seed(args.seed + 2)
    L, items = args.packed_len, []
    while sum(len(it["input_ids"]) for it in items) < args.packed_rows * L * 0.9:
        n = int(torch.randint(min(32, L // 4), L // 2, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g)
        items.append(dict(input_ids=ids, labels=ids, images={"pixel_values": torch.zeros(0, 3, 1, 1)},
                          where=f"sample {len(items)}"))
    b = pack(items, pad_id=0, max_length=L)
    return b["input_ids"].to(device), b["attention_mask"].to(device), b["packing"].to(device)


def bench_qwen2_packed(args, ours, device, dtype):
    ids, mask, packing = packed_batch(args, device, ours.cfg.vocab_size)
    B, T = ids.shape
    train = device.type == "cuda"   # FlexAttention has no CPU backward
    print(f"qwen2-packed: {B} rows x {T} tokens, {len(packing.cu_seqlens) - 1} runs (samples and padding), "
          f"{'forward + backward' if train else 'forward only'}")
    if not train:   # uncompiled on the CPU: torch's unfused reference path, which warns that it is one
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    backends = ["sdpa"] + (["flex"] if HAVE_FLEX else []) + (["flash"] if HAVE_FLASH and train and
                                                             dtype != torch.float32 else [])
    real = mask > 0

    def run(name):
        ours.cfg.attn_backend = name
        with torch.set_grad_enabled(train):
            h = ours.hidden_states(ids, packing=packing)
            if train:
                h.float().pow(2).mean().backward()
        return h

    with torch.no_grad():
        ref = run("sdpa").float()
        for name in backends[1:]:
            check_close("packed hidden states", run(name).float()[real], ref[real], dtype, (name, "dense mask"))
    ours.train(train)
    t = time_alternating({n: lambda n=n: run(n) for n in backends}, device, args.warmup, args.repeats,
                         before=lambda n: ours.zero_grad(set_to_none=True))
    ours.zero_grad(set_to_none=True), ours.eval()
    ours.cfg.attn_backend = "auto"
    return [result(f"qwen2 packed rows, {n} vs dense mask", "tokens/s", B * T, t, n, "sdpa") for n in backends[1:]]


def bench_chunked_ce(args, device, dtype, V=151936, C=896):
    N = args.ce_tokens
    print(f"chunked-ce: {N} labelled tokens, vocabulary {V}, hidden {C}, forward + backward")
    g = torch.Generator().manual_seed(args.seed + 3)
    h = torch.randn(N, C, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    sides = {"chunked": lambda: linear_cross_entropy(h, w, targets).backward(),
             "plain": lambda: F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum").backward()}
    peaks = {}
    for name, fn in sides.items():
        h.grad = w.grad = None
        with PeakMemory() as mem:
            fn()
        peaks[name] = mem.peak
    print(f"  peak bytes of tensors alive (forward + backward, inputs not counted): plain "
          f"{peaks['plain'] / 2**20:,.0f} MiB, chunked {peaks['chunked'] / 2**20:,.0f} MiB "
          f"({peaks['plain'] / peaks['chunked']:.1f}x less); all the logits in fp32: {N * V * 4 / 2**20:,.0f} MiB")
    t = time_alternating(sides, device, args.warmup, args.repeats,
                         before=lambda n: (setattr(h, "grad", None), setattr(w, "grad", None)))
    return [result("chunked cross-entropy vs plain", "tokens/s", N, t, "chunked", "plain"),
            ("chunked cross-entropy vs plain", "peak MiB", peaks["chunked"] / 2**20, peaks["plain"] / 2**20, None,
             "plain")]


# ---- SigLIP ----------------------------------------------------------------------------------------------------

def bench_siglip(args, tmp, device, dtype):
    B = args.vit_batch
    print(f"siglip: forward, {B} images of 224x224, {args.vit_layers} layers, no_grad")
    cfg = SiglipVisionConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=args.vit_layers, num_attention_heads=12, layer_norm_eps=1e-6,
                             vision_use_head=False, attn_implementation="sdpa")
    # vision_use_head=False: SiglipVisionModel would otherwise also run the attention-pooling head (the
    # contrastive pooler), which our tower leaves out since a VLM uses every patch; we time the same work.
    randomize(SiglipVisionModel(cfg), std=0.02, seed=args.seed).save_pretrained(tmp)
    theirs = SiglipVisionModel.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    ours = SiglipViT.from_pretrained(tmp, dtype=dtype).to(device)
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed)).to(device, dtype)
    with torch.no_grad():
        check_close("siglip hidden states", ours(x), theirs(pixel_values=x).last_hidden_state, dtype)
        t = time_alternating({"ours": lambda: ours(x), "transformers": lambda: theirs(pixel_values=x)},
                             device, args.warmup, args.repeats)
    return result("siglip forward", "images/s", B, t)


# ---- main ------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device, dtype = torch.device(args.device), config_dtype(args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its save/load bars would clutter the table
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} threads of {os.cpu_count()} cores"
    print(f"device {device} ({where}) | dtype {args.dtype} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | warmup {args.warmup}, median of {args.repeats}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if {"qwen2-train", "qwen2-decode", "qwen2-packed"} & set(args.only):
            print(f"qwen2: Qwen2.5-0.5B shape with {args.layers} layers")
            ours, theirs = qwen2_pair(args, Path(tmp) / "qwen2", device, dtype)
            if "qwen2-train" in args.only:
                rows.append(bench_qwen2_train(args, ours, theirs, device, dtype))
            if "qwen2-decode" in args.only:
                rows += bench_qwen2_decode(args, ours, theirs, device, dtype)
            del theirs
            if "qwen2-packed" in args.only:
                rows += bench_qwen2_packed(args, ours, device, dtype)
            del ours
        if "chunked-ce" in args.only:
            rows += bench_chunked_ce(args, device, dtype)
        if "siglip" in args.only:
            rows.append(bench_siglip(args, Path(tmp) / "siglip", device, dtype))

    print()
    head = ("benchmark", "unit", "nanovlm", "against", "its value", "ratio", "cpu-time ratio")
    table = [head]
    for n, u, a, b, c, other in rows:   # a memory row: less is better, so the ratio is theirs / ours
        ratio = b / a if u == "peak MiB" else a / b
        table.append((n, u, f"{a:,.2f}", other, f"{b:,.2f}", f"{ratio:.2f}x", "" if c is None else f"{c:.2f}x"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i in (0, 1, 3) else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) if i in (0, 1, 3) else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in table[1:]:
        print(line(r))
    print("ratio = nanovlm throughput / the other side's, by median wall time (> 1: nanovlm is faster; for peak MiB,\n"
          "the other side's bytes / nanovlm's); cpu-time ratio = the other side's / nanovlm's median CPU seconds of\n"
          "this process per call (robust to other programs sharing the cores; on CUDA it measures host-side overhead)")
    return rows


if __name__ == "__main__":
    main()
