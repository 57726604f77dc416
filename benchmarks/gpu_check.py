"""Everything a lent GPU should measure, in one run of under 5 minutes, at the real-weights preset's shape
(Qwen2.5-0.5B + SigLIP-B/16-224) with random weights built here: nothing is downloaded.

    python benchmarks/gpu_check.py --out gpu_check.json                    # on the GPU
    python benchmarks/gpu_check.py --out gpu_check.json --pytest           # + python -m pytest -m gpu -q
    python benchmarks/gpu_check.py --small --device cpu --out /tmp/g.json  # a reduced shape, for a CPU
    python benchmarks/gpu_check.py --only env build sft --sft-args="--compile"   # some sections, an SFT variant

Sections, each timed; once --budget-s is spent, the sections left are skipped with a message:
  env        torch, transformers, the device; whether flash_attn imports; what nanovlm.attention.resolve_backend
             picks for bf16 q/k/v on this device
  build      official-layout checkpoints with random weights, written by transformers: Qwen2ForCausalLM at
             Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, 151,936 tied rows) with the
             synthetic dataset's tokenizer beside it (--tokenizer: another tokenizer.json), a SiglipVisionModel
             at siglip-base-patch16-224's shape, and the synthetic dataset at 224x224
  sft        train_sft.py's loop (--preset qwen2.5-0.5b-siglip --lm ... --vision ... --dtype bf16, the preset's
             batch), run in this process with the environment torchrun --nproc_per_node=1 gives it: tokens/s and
             MFU as the loop logs them to metrics.jsonl (the median of the log windows after step 0, which holds
             the start-up), and peak memory; plus, at every attention call, the q/k/v dtypes and the backend
             the resolver picked
  decode     greedy decoding with a KV cache, new tokens/s at batch 1 and 8 (prefill included), bf16 weights:
             nanovlm's VLM.generate (what sample.py and GRPO run), nanovlm's bare Qwen2 + KVCache loop
             (benchmarks/bench_models.py), and transformers' generate on the same checkpoint, in the same run
  fast       issue 24's paths on this device (benchmarks/bench_models.py and bench_rollout.py): the LM on packed
             rows with each packed-attention backend (flash varlen, flex) against the dense block-diagonal mask,
             forward + backward; the chunked cross-entropy's peak memory and time against the plain one at 8,192
             labelled tokens; GRPO-shaped rollouts of the tiny preset (64 prompts x 8 samples, 24 tokens):
             VLM.generate eager and with the compiled decode step (CUDA graphs), against commit e8488d6's
             generate (when the git history is there) and transformers' (LM only)
  pytest     (--pytest) python -m pytest -m gpu -q, its last line and exit code

The summary table is printed last; --out writes every number as JSON, after each section (a run cut short keeps
what it measured). Exit code 1 when a section failed (its error is in the table and the JSON).
"""

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]   # the repo's nanovlm and train_sft.py, installed or not

import torch  # noqa: E402

import nanovlm.attention  # noqa: E402
from bench_models import greedy_ours, greedy_theirs, time_alternating  # noqa: E402

# The real preset's shape, and a reduced one that runs in seconds on a CPU (tests/test_gpu_check.py).
SHAPES = {
    "full": dict(lm=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
                 vision=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12),
                 images=256,                                                  # synthetic scenes (and as many OCR)
                 sft=dict(steps=16, log_every=5, flags=[]),                   # the preset's own batch and length
                 decode=dict(batches=(1, 8), prompt=64, new=64, warmup=1, repeats=3)),
    "small": dict(lm=dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
                  vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2),
                  images=16,
                  sft=dict(steps=3, log_every=1,
                           flags=["--batch-size", "2", "--grad-accum", "1", "--max-length", "256"]),
                  decode=dict(batches=(1, 8), prompt=8, new=4, warmup=1, repeats=1)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="write the results here as JSON (after every section)")
    p.add_argument("--small", action="store_true", help="a reduced shape (tiny LM and ViT) for a CPU test run")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda or cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training autocast dtype "
                   "and decoding weights' dtype")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip the sections left once this many seconds "
                   "have passed")
    p.add_argument("--sft-steps", type=int, help="optimizer steps of the SFT section (none: the shape's, 16 full, "
                   "3 small)")
    p.add_argument("--sft-args", default="", help="more train_sft.py flags for the SFT section, e.g. "
                   "'--compile' or '--grad-checkpointing' (they come last, so they win)")
    p.add_argument("--tokenizer", help="a tokenizer.json (or .json.gz) with Qwen's special tokens to put beside the "
                   "LM, e.g. ../shared/qwen-tokenizer/tokenizer.json.gz (none: the synthetic dataset's)")
    p.add_argument("--pytest", action="store_true", help="also run python -m pytest -m gpu -q")
    p.add_argument("--only", nargs="+", choices=["env", "build", "sft", "decode", "fast", "pytest"],
                   help="run these sections only (sft, decode and fast need build)")
    p.add_argument("--work-dir", help="build checkpoints and data here and keep them (none: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- watching the run ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def watch_attention(counts, phase):
    """At every attention call of the LM (nanovlm.qwen2) and the ViT (nanovlm.siglip), count (phase, model, q/k/v
    dtypes, backend), the backend being what nanovlm.attention.resolve_backend returned during that call: the one
    that ran, whatever the resolver's signature."""
    import nanovlm.qwen2
    import nanovlm.siglip
    choices, resolve = [], nanovlm.attention.resolve_backend

    def spy_resolve(*args, **kwargs):
        choices.append(resolve(*args, **kwargs))
        return choices[-1]

    def spy(model, attention):
        def call(q, k, v, *args, **kwargs):
            n = len(choices)
            y = attention(q, k, v, *args, **kwargs)
            backend = choices[-1] if len(choices) > n else "unresolved"
            key = f"{phase} | {model} | q {dtype_name(q)}, k {dtype_name(k)}, v {dtype_name(v)} -> {backend}"
            counts[key] = counts.get(key, 0) + 1
            return y
        return call

    patched = [(nanovlm.attention, "resolve_backend", spy_resolve)]
    patched += [(m, "attention", spy(name, m.attention)) for m, name in ((nanovlm.qwen2, "LM"),
                                                                           (nanovlm.siglip, "ViT"))
                if hasattr(m, "attention")]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patched]
    try:
        for m, name, f in patched:
            setattr(m, name, f)
        yield
    finally:
        for m, name, f in saved:
            setattr(m, name, f)


def dtype_name(t):
    return str(t.dtype).replace("torch.", "")


@contextlib.contextmanager
def torchrun_env():
    """The variables torchrun --standalone --nproc_per_node=1 sets, for the time of the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="gpu_check")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def record_setup(seen):
    """What train_utils.setup_distributed gave the loop (whether it runs under DDP)."""
    from nanovlm import train_utils as tu
    setup = tu.setup_distributed

    def spy(*args, **kwargs):
        seen.append(setup(*args, **kwargs))
        return seen[-1]
    tu.setup_distributed = spy
    try:
        yield
    finally:
        tu.setup_distributed = setup


def gib(n_bytes):
    return round(n_bytes / 2**30, 2)


# ---- sections ------------------------------------------------------------------------------------------------


def section_env(ctx):
    device, dtype = ctx["device"], ctx["dtype"]
    out = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cuda": torch.version.cuda, "shape": ctx["shape_name"]}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        out["memory_gib"] = gib(torch.cuda.get_device_properties(device).total_memory)
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    if importlib.util.find_spec("flash_attn") is None:
        out["flash_attn"] = "not installed"
    else:
        try:
            import flash_attn
            out["flash_attn"] = f"imports ({flash_attn.__version__})"
        except Exception as e:   # installed but broken (a build for another torch or CUDA)
            out["flash_attn"] = f"installed, fails to import: {type(e).__name__}: {e}"
    q = torch.zeros(1, 8, 2, 64, device=device, dtype=dtype)
    try:
        choice = nanovlm.attention.resolve_backend("auto", q)
    except TypeError:   # a resolver that takes (backend, device, dtype, ...)
        choice = nanovlm.attention.resolve_backend("auto", q.device, q.dtype)
    out["resolve_backend"] = f"{choice} (for {dtype_name(q)} q/k/v on {device.type})"
    return out


def section_build(ctx):
    """Official-layout checkpoints with random weights (transformers writes them) and the synthetic dataset."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    from nanovlm.synthetic import generate, synthetic_tokenizer
    from nanovlm.tokenizer import Tokenizer
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    shape, work = ctx["shape"], ctx["work"]
    image_size = shape["vision"]["image_size"]
    t0 = time.perf_counter()
    generate(str(work / "data"), n_train=shape["images"], n_val=4, seed=ctx["seed"], image_size=image_size)
    t_data = time.perf_counter() - t0
    if ctx["tokenizer"]:
        tok_path = work / "tokenizer.json"
        opener = gzip.open if ctx["tokenizer"].endswith(".gz") else open
        with opener(ctx["tokenizer"], "rb") as src, open(tok_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tok = Tokenizer.from_file(tok_path)
    else:
        tok = synthetic_tokenizer(str(work / "data"))
    if tok.num >= shape["lm"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the LM's {shape['lm']['vocab_size']} rows")
    torch.manual_seed(ctx["seed"])
    lm = Qwen2ForCausalLM(Qwen2Config(**shape["lm"], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                                      tie_word_embeddings=True, bos_token_id=tok.endoftext, eos_token_id=tok.im_end))
    lm.to(torch.bfloat16).save_pretrained(work / "qwen")   # bf16 on disk, as Qwen2.5-0.5B-Instruct ships
    tok.save(str(work / "qwen"))
    vis = SiglipVisionModel(SiglipVisionConfig(**shape["vision"], layer_norm_eps=1e-6))
    vis.to(torch.bfloat16).save_pretrained(work / "siglip")
    ctx["tok"] = tok
    return {"lm_params_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 3),
            "vision_params_m": round(sum(p.numel() for p in vis.parameters()) / 1e6, 3),
            "tokenizer": f"{ctx['tokenizer'] or 'synthetic dataset'}, {len(tok)} tokens",
            "data_s": round(t_data, 1)}


def section_sft(ctx):
    import train_sft
    shape, work, device = ctx["shape"], ctx["work"], ctx["device"]
    s = shape["sft"]
    steps = ctx["sft_steps"] or s["steps"]
    out = work / "sft"
    data = work / "data"
    argv = ["--preset", "qwen2.5-0.5b-siglip", "--lm", str(work / "qwen"), "--vision", str(work / "siglip"),
            "--data", str(data / "sft_train.json"), str(data / "ocr_train.jsonl"),
            "--image-size", str(shape["vision"]["image_size"]), *s["flags"], "--max-steps", str(steps),
            "--log-every", str(s["log_every"]), "--eval-every", "1000000", "--save-every", "1000000",
            "--eval-answers", "0", "--device", device.type, "--dtype", ctx["dtype_name"], "--seed", str(ctx["seed"]),
            "--out-dir", str(out), *shlex.split(ctx["sft_args"])]
    dists = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torchrun_env(), record_setup(dists), watch_attention(ctx["attention"], "sft"):
        train_sft.main(argv)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in rows if "tokens_per_s" in r]
    steady = windows[1:] or windows   # the first window is step 0 alone: CUDA and cuBLAS start-up, allocations
    result = {"command": "train_sft.py " + " ".join(argv), "steps": steps,
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
              "mfu": statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
              "loss_first_last": [windows[0]["loss"], windows[-1]["loss"]],
              "windows": [{k: r[k] for k in ("step", "tokens_per_s", "mfu", "loss") if k in r} for r in windows],
              "ddp": bool(dists and dists[0].ddp), "world_size": dists[0].world_size if dists else None,
              "wall_s_with_load_and_save": round(wall, 1)}
    if device.type == "cuda":
        result["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        result["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return result


def section_decode(ctx):
    from transformers import Qwen2ForCausalLM

    from nanovlm.projector import ProjectorConfig
    from nanovlm.vlm import VLM
    shape, work, device, dtype, tok = ctx["shape"], ctx["work"], ctx["device"], ctx["dtype"], ctx["tok"]
    d = shape["decode"]
    # stop_token_ids (-1,): no token stops a row, so every row decodes exactly `new` tokens, as transformers'
    # min_new_tokens makes it do; both read the same official checkpoint in the same dtype.
    ours = VLM.from_backbones(work / "qwen", work / "siglip", ProjectorConfig(shuffle_factor=2), dtype=dtype,
                              image_token_id=tok.image_pad, stop_token_ids=(-1,), pad_token_id=tok.endoftext)
    ours = ours.to(device).eval()
    theirs = Qwen2ForCausalLM.from_pretrained(work / "qwen", dtype=dtype, attn_implementation="sdpa").to(device).eval()
    special = set(tok.stop_ids) | {tok.im_start, tok.vision_start, tok.vision_end, tok.image_pad, tok.num}
    ordinary = torch.tensor(sorted(set(range(len(tok))) - special))
    g = torch.Generator().manual_seed(ctx["seed"])
    rows = {}
    for B in d["batches"]:
        prompt = ordinary[torch.randint(len(ordinary), (B, d["prompt"]), generator=g)]       # (B, P) token ids
        on_device, as_lists = prompt.to(device), prompt.tolist()
        with watch_attention(ctx["attention"], "decode"):
            a = torch.tensor(ours.generate(as_lists, max_new_tokens=d["new"]))
        b = greedy_theirs(theirs, on_device, d["new"]).cpu()
        t = time_alternating({"nanovlm VLM.generate": lambda: ours.generate(as_lists, max_new_tokens=d["new"]),
                              "nanovlm Qwen2 + KVCache loop": lambda: greedy_ours(ours.lm, on_device, d["new"]),
                              "transformers generate": lambda: greedy_theirs(theirs, on_device, d["new"])},
                             device, d["warmup"], d["repeats"])
        rows[f"batch {B}"] = {"new_tokens_per_s": {k: B * d["new"] / wall for k, (wall, _) in t.items()},
                              "greedy_tokens_equal": f"{int((a == b).sum())}/{b.numel()}"}
    return {"prompt_tokens": d["prompt"], "new_tokens": d["new"], "weights": ctx["dtype_name"],
            "timing": f"median of {d['repeats']} after {d['warmup']} warm-up, sides alternating", **rows}


def section_fast(ctx):
    import bench_models
    import bench_rollout

    from nanovlm.qwen2 import Qwen2
    small, device, dtype = ctx["shape_name"] == "small", ctx["device"], ctx["dtype"]
    args = argparse.Namespace(seed=ctx["seed"], warmup=1, repeats=1 if small else 3, packed_rows=2 if small else 8,
                              packed_len=128 if small else 2048, ce_tokens=64 if small else 8192)
    lm = Qwen2.from_pretrained(ctx["work"] / "qwen", dtype=dtype).to(device)
    rows = bench_models.bench_qwen2_packed(args, lm, device, dtype)
    del lm
    rows += bench_models.bench_chunked_ce(args, device, dtype)
    history = subprocess.run(["git", "cat-file", "-e", f"{bench_rollout.BASELINE}^{{commit}}"], cwd=ROOT,
                             capture_output=True).returncode == 0
    argv = ["--device", str(device), "--repeats", str(args.repeats)] + ([] if history else ["--skip", "e8488d6"])
    argv += ["--prompts", "2", "--samples", "2", "--new-tokens", "3"] if small else []
    argv += ["--compile"] if device.type == "cuda" else []   # compiling on a CPU takes minutes
    rows += [(label, "new tokens/s", tokens_a, tokens_b, cpu, "") for label, tokens_a, tokens_b, _, cpu
             in bench_rollout.main(argv)]
    return {"rows": [{"what": f"{r[0]}" + (f" (vs {r[5]})" if r[5] else ""), "unit": r[1], "nanovlm": r[2],
                      "other": r[3]} for r in rows],
            "rollout_baseline": "commit e8488d6" if history else "skipped: no git history of e8488d6 here"}


def section_pytest(ctx):
    left = max(30, int(ctx["budget_s"] - (time.perf_counter() - ctx["t_start"])))
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                           capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {"result": f"FAILED: timed out after {left}s"}
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"exit_code": p.returncode, "last_line": last,
            "result": "passed" if p.returncode == 0 else ("no gpu tests collected" if p.returncode == 5 else "FAILED"),
            "tail": p.stdout[-3000:] + p.stderr[-2000:]}


# ---- summary -------------------------------------------------------------------------------------------------


def summary_rows(results, attention):
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)   # noqa: E731
    rows = []
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            rows.append((name, "ERROR" if "error" in r else "skipped", r.get("error") or r["skipped"]))
        elif name == "env":
            rows += [("env", "device", r.get("device_name", r["device"])),
                     ("env", "torch / transformers", f"{r['torch']} / {r['transformers']}"),
                     ("env", "flash_attn", r["flash_attn"]), ("env", "resolve_backend", r["resolve_backend"])]
        elif name == "build":
            rows.append(("build", "parameters", f"LM {r['lm_params_m']}M, ViT {r['vision_params_m']}M (with the "
                         "pooling head of the official layout, which nanovlm does not load)"))
        elif name == "sft":
            rows += [("sft", "tokens/s", fmt(r["tokens_per_s"], ",.0f")),
                     ("sft", "MFU (as the loop logs it)", fmt(r["mfu"], ".1%")),
                     ("sft", "peak memory", f"{r['peak_memory_gib']} GiB allocated, {r['peak_reserved_gib']} reserved"
                      if "peak_memory_gib" in r else "n/a (CPU)"),
                     ("sft", "processes / DDP", f"{r['world_size']} / {'yes' if r['ddp'] else 'no'}"),
                     ("sft", "loss first -> last window", " -> ".join(f"{x:.3f}" for x in r["loss_first_last"]))]
        elif name == "decode":
            for batch, v in r.items():
                if batch.startswith("batch"):
                    tps = v["new_tokens_per_s"]
                    theirs = tps["transformers generate"]
                    for side, x in tps.items():
                        ratio = "" if side.startswith("transformers") else f" ({x / theirs:.2f}x transformers)"
                        rows.append((f"decode {batch}", side, f"{x:,.1f} new tokens/s{ratio}"))
                    rows.append((f"decode {batch}", "greedy tokens equal", v["greedy_tokens_equal"]))
        elif name == "fast":
            for x in r["rows"]:
                less_is_better = x["unit"] == "peak MiB"
                ratio = x["other"] / x["nanovlm"] if less_is_better else x["nanovlm"] / x["other"]
                rows.append(("fast", x["what"], f"{x['nanovlm']:,.1f} vs {x['other']:,.1f} {x['unit']} "
                             f"({'other / nanovlm' if less_is_better else 'nanovlm / other'}: {ratio:.2f}x)"))
        elif name == "pytest":
            rows.append(("pytest -m gpu", r["result"], r.get("last_line", "")))
        if "seconds" in r:
            rows.append((name, "section time", f"{r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU"))
    for key, n in attention.items():
        rows.append(("attention", key, f"{n} calls"))
    return rows


def print_table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(2)]
    print("\n" + "-" * 100)
    for a, b, c in rows:
        print(f"{a:<{widths[0]}} | {b:<{widths[1]}} | {c}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    from nanovlm.weights import config_dtype
    ctx = dict(shape_name="small" if args.small else "full", shape=SHAPES["small" if args.small else "full"],
               device=device, dtype=config_dtype(args.dtype), dtype_name=args.dtype, seed=args.seed,
               tokenizer=args.tokenizer, sft_steps=args.sft_steps, sft_args=args.sft_args, budget_s=args.budget_s,
               t_start=time.perf_counter(), attention={})
    sections = [("env", section_env), ("build", section_build), ("sft", section_sft), ("decode", section_decode),
                ("fast", section_fast), ("pytest", section_pytest)]
    wanted = args.only or ["env", "build", "sft", "decode", "fast"] + ["pytest"] * args.pytest
    sections = [(name, run) for name, run in sections if name in wanted]
    results, failed = {}, False
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            ctx["work"] = Path(args.work_dir)
            ctx["work"].mkdir(parents=True, exist_ok=True)
        else:
            ctx["work"] = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        for name, run in sections:
            spent = time.perf_counter() - ctx["t_start"]
            if spent > args.budget_s:
                results[name] = {"skipped": f"--budget-s {args.budget_s:.0f} spent ({spent:.0f} s)"}
                print(f"\n== {name}: skipped, the budget of {args.budget_s:.0f} s is spent ({spent:.0f} s)", flush=True)
            elif name in ("sft", "decode", "fast") and "tok" not in ctx:
                results[name] = {"skipped": "no checkpoints (build did not finish)"}
            else:
                print(f"\n== {name}", flush=True)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    results[name] = run(ctx)
                except Exception as e:   # one broken section must not cost the others' numbers
                    traceback.print_exc()
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
                    failed = True
                # CPU seconds of this process too: the wall clock says little on a CPU that others share
                results[name].update(seconds=round(time.perf_counter() - t0, 1),
                                     cpu_seconds=round(time.process_time() - c0, 1))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results["attention"] = {"calls": ctx["attention"]}
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    results["total_seconds"] = round(time.perf_counter() - ctx["t_start"], 1)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print_table(summary_rows({k: v for k, v in results.items() if k not in ("attention", "total_seconds")},
                             ctx["attention"]) + [("total", "time", f"{results['total_seconds']:.1f} s")])
    return results, failed


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
