"""GRPO rollouts: today's VLM.generate against the one of commit e8488d6, and against transformers' generate on the
same weights (language model only), in one run.

    python benchmarks/bench_rollout.py                       # tiny preset, 64 prompts x 8 samples, 24 new tokens
    python benchmarks/bench_rollout.py --prompts 16 --repeats 3
    python benchmarks/bench_rollout.py --compile             # adds a side with the compiled decode step
    python benchmarks/bench_rollout.py --device cuda --compile   # on a GPU: CUDA graphs
    python benchmarks/bench_rollout.py --help

The shape is train_grpo.py's on the tiny preset: the tiny model (nanovlm/vlm_train.py TINY_LM / TINY_VISION, random
weights, a vocabulary the size of the synthetic tokenizer's), OCR-like prompts (an image of 9 tokens and a
question, 20-30 tokens in all), --samples completions of each, sampled at temperature 1, --new-tokens each.
Random weights rarely sample the stop token, so nearly every row runs the full --new-tokens: the decoding share
is as large as it gets.

Sides:
  e8488d6       the generate of commit e8488d6, run as its GRPO rollout ran it: each prompt and its image repeated
                --samples times. Its code is taken from this repository's history at run time (git archive into a
                temporary package), so it is that commit's code exactly; the weights are ours, copied in.
  ours          VLM.generate(prompts, pixel_values, num_samples=...): what grpo.rollout calls now.
  ours+compile  the same with compile=True (--compile; its compile time is excluded, it is reported apart).
  lm-only       the language model alone on the same prompts without images: ours vs transformers'
                Qwen2ForCausalLM.generate (do_sample, top_k=0, num_return_sequences), the same weights.

Before timing, greedy decoding is compared side against side: the same tokens, or no timing. Timing alternates the
sides round by round; the median is reported, with the ratio of CPU time this process spent (robust to other
programs on the machine, which wall-clock ratios are not).
"""

import argparse
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2ForCausalLM

from nanovlm.qwen2 import Qwen2Config
from nanovlm.siglip import SiglipConfig
from nanovlm.vlm import VLM, VLMConfig
from nanovlm.vlm_train import TINY_LM, TINY_VISION

BASELINE = "e8488d6"
VOCAB = 1040          # the synthetic tokenizer's size: 1024 BPE tokens and the chat specials
IMAGE, STOP, PAD = 1030, 1031, 1032


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="prompts per rollout")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO's num_generations)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    p.add_argument("--skip", nargs="*", default=[], choices=["e8488d6", "lm-only"], help="sides to leave out")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_baseline(commit=BASELINE):
    """The nanovlm package of `commit`, importable as nanovlm_<commit>: git archive into a temporary folder, every
    `nanovlm` import renamed. Needs this repository's git history."""
    root = Path(__file__).resolve().parents[1]
    try:
        data = subprocess.run(["git", "archive", commit, "nanovlm"], cwd=root, capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"cannot read commit {commit} from {root} ({e}): run from a git clone, or --skip e8488d6")
    tmp = Path(tempfile.mkdtemp(prefix="nanovlm_baseline_"))
    tarfile.open(fileobj=io.BytesIO(data)).extractall(tmp)
    name = f"nanovlm_{commit}"
    (tmp / "nanovlm").rename(tmp / name)
    for f in (tmp / name).glob("*.py"):
        f.write_text(re.sub(r"\bnanovlm\b(?=[.\s])", name, f.read_text()))
    sys.path.insert(0, str(tmp))
    return __import__(f"{name}.vlm", fromlist=["VLM"])


def tiny_vlm(seed):
    torch.manual_seed(seed)
    kw = dict(lm=dict(vocab_size=VOCAB, **TINY_LM), vision=dict(image_size=96, patch_size=16, **TINY_VISION),
              image_token_id=IMAGE, stop_token_ids=(STOP,), pad_token_id=PAD)
    return VLM(VLMConfig(lm=Qwen2Config(**kw["lm"]), vision=SiglipConfig(**kw["vision"]),
                         **{k: v for k, v in kw.items() if k not in ("lm", "vision")})).eval(), kw


def ocr_prompts(n, image_tokens, seed):
    """n prompts of 20-30 tokens: a start token, the image's pad tokens, then question tokens."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + [IMAGE] * image_tokens + torch.randint(2, 1000, (19 + i % 11 - image_tokens,), generator=g).tolist()
            for i in range(n)]


def time_alternating(fns, warmup, repeats, device):
    """{name: callable} -> {name: (median wall s, median CPU s of this process)}, sides alternating each round."""
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            sync()
            if r >= warmup:
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    P, G, N = args.prompts, args.samples, args.new_tokens
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} threads of {os.cpu_count()} cores"
    print(f"{device} ({where}) | "
          f"torch {torch.__version__} | transformers {transformers.__version__} | {P} prompts x {G} samples, "
          f"{N} new tokens, temperature {args.temperature} | warmup {args.warmup}, median of {args.repeats}")
    ours, kw = tiny_vlm(args.seed)
    ours.to(device)
    prompts = ocr_prompts(P, ours.cfg.image_tokens, args.seed)
    pixels = torch.randn(P, 3, 96, 96, generator=torch.Generator().manual_seed(args.seed)).to(device)
    rows = [p for p in prompts for _ in range(G)]
    pixel_rows = pixels.repeat_interleave(G, 0)
    gen = lambda: torch.Generator(device).manual_seed(args.seed)   # noqa: E731  the same draws every round
    sample = dict(max_new_tokens=N, temperature=args.temperature, include_stop=True)
    sides, results = {"ours": lambda: ours.generate(prompts, pixels, num_samples=G, generator=gen(), **sample)}, []

    if "e8488d6" not in args.skip:
        old_vlm = load_baseline()
        old = old_vlm.VLM(old_vlm.VLMConfig(**kw)).to(device).eval()
        old.load_state_dict(ours.state_dict())
        check = [p for p in prompts[:8]]
        a = ours.generate(check, pixels[:8], max_new_tokens=N)
        b = old.generate(check, pixels[:8], max_new_tokens=N)
        print(f"check greedy tokens, ours vs {BASELINE}: {'identical' if a == b else 'DIFFERENT'}")
        assert a == b, f"ours and {BASELINE} decode different greedy tokens: not timing"
        sides[BASELINE] = lambda: old.generate(rows, pixel_rows, generator=gen(), **sample)
    if args.compile:
        t0 = time.perf_counter()
        a = ours.generate(prompts, pixels, num_samples=G, generator=gen(), compile=True, **sample)
        print(f"compile: first call (compiles the decode step) {time.perf_counter() - t0:.1f} s; "
              f"same sampled tokens as uncompiled: {a == sides['ours']()}")
        sides["ours+compile"] = lambda: ours.generate(prompts, pixels, num_samples=G, generator=gen(), compile=True,
                                                      **sample)

    with torch.no_grad():
        t = time_alternating(sides, args.warmup, args.repeats, device)
    tokens = P * G * N
    for a, b in (("ours", BASELINE), ("ours+compile", BASELINE), ("ours+compile", "ours")):
        if a in t and b in t:
            results.append((f"rollout: {a} vs {b}", t, a, b))

    if "lm-only" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            ours.lm.save_pretrained(tmp)
            theirs = Qwen2ForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
        text = [[t for t in p if t != IMAGE] for p in prompts]
        T = max(map(len, text))
        ids = torch.full((P, T), PAD)
        mask = torch.zeros(P, T, dtype=torch.long)
        for i, p in enumerate(text):               # transformers decodes a batch left-padded
            ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(device), mask.to(device)

        def hf(do_sample, n=G, rows=P):
            out = theirs.generate(ids[:rows], attention_mask=mask[:rows], do_sample=do_sample, temperature=None
                                  if not do_sample else args.temperature, top_k=0, top_p=1.0, max_new_tokens=N,
                                  num_return_sequences=n, eos_token_id=STOP, pad_token_id=PAD)
            return out[:, T:]
        with torch.no_grad():
            a = ours.generate(text[:8], None, max_new_tokens=N)
            b = hf(False, 1, 8).tolist()
            b = [row[:row.index(STOP)] if STOP in row else row for row in b]
        print(f"check greedy tokens, ours vs transformers (LM only): {'identical' if a == b else 'DIFFERENT'}")
        assert a == b, "ours and transformers decode different greedy tokens: not timing"
        with torch.no_grad():
            t = time_alternating({"ours": lambda: ours.generate(text, None, num_samples=G, generator=gen(), **sample),
                                  "transformers": lambda: hf(True)}, args.warmup, args.repeats, device)
        results.append(("lm-only: ours vs transformers", t, "ours", "transformers"))

    print()
    print("| comparison | first: new tokens/s | second: new tokens/s | ratio | cpu-time ratio |")
    print("|---|---:|---:|---:|---:|")
    rows_out = []
    for label, t, a, b in results:
        (wa, ca), (wb, cb) = t[a], t[b]
        rows_out.append((label, tokens / wa, tokens / wb, wb / wa, cb / ca))
        print(f"| {label} | {tokens / wa:,.0f} | {tokens / wb:,.0f} | {wb / wa:.2f}x | {cb / ca:.2f}x |")
    print(f"ratio = second's median wall time / first's (> 1: the first is faster); cpu-time ratio = the same in CPU\n"
          f"seconds of this process (robust to other programs sharing the cores). {P} x {G} x {N} new tokens a "
          "rollout.")
    return rows_out


if __name__ == "__main__":
    main()
