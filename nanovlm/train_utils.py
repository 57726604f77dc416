"""Training plumbing shared by every train_*.py script: plain functions, no trainer class.

    dist = setup_distributed("auto")                 # torchrun env vars -> DDP (nccl on CUDA, gloo on CPU)
    ctx = autocast_context(dist.device, "auto")      # bf16 autocast on capable GPUs, fp32 on CPU
    opt = make_optimizer([("lm", model.parameters(), 3e-4)], weight_decay=0.1)
    for step in range(start, max_steps):
        set_lr(opt, step, max_steps, warmup_steps=100)
        for micro in range(accum):
            idx = batch_indices(step, micro, dist.rank, dist.world_size, micro_batch, accum, n, seed)
            with sync_context(model, micro == accum - 1), ctx:
                loss = model(...) / accum
            loss.backward()
        check_finite(loss, step); opt.step(); opt.zero_grad(set_to_none=True)
    save_checkpoint(dir, model, config, optimizer=opt, step=step + 1)

Exact resume. The data order is a pure function of (step, micro_step, rank, seed), so a resumed run reads the
same batches as an uninterrupted one, and DDP over W processes reads the same samples as one process doing W
accumulation micro-steps. The checkpoint stores the optimizer and every rank's RNG states (for dropout).
"""

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_model, save_model

from nanovlm import weights
from nanovlm.muon import Muon

# --------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int = 0          # global process index
    local_rank: int = 0    # index on this machine (picks the GPU)
    world_size: int = 1
    device: str = "cpu"
    ddp: bool = False

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; start a process group when there is more than one process."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    ddp = world_size > 1
    if ddp and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device, ddp)


def cleanup_distributed():
    if torch_dist.is_initialized():
        # Wait for every rank first: rank 0 may still be evaluating or saving, and tearing down gloo while a
        # peer is mid-work aborts the early rank ("terminate called without an active exception").
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def unwrap(model):
    """The plain module inside DDP and/or torch.compile wrappers (what checkpoints store)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def sync_context(model, sync):
    """Gradient accumulation: DDP all-reduces gradients only on the last micro-step (sync=True)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


# --------------------------------------------------------------------------------------------------------------
# Precision


def resolve_dtype(device, dtype_name="auto"):
    """"auto": bf16 on a CUDA GPU that supports it, else fp32 (CPU autocast is slow and rarely worth it)."""
    if dtype_name == "auto":
        cuda = str(device).startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return weights.config_dtype(dtype_name)   # "bf16" / "bfloat16" / ...; an unknown name is an error naming it


def autocast_context(device, dtype_name="auto"):
    """Mixed precision for the forward pass; weights and optimizer stay fp32. fp16 also needs grad_scaler."""
    dtype = resolve_dtype(device, dtype_name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device, dtype_name="auto"):
    """A loss scaler for fp16 autocast: fp16 gradients underflow to 0 below ~6e-8, so the loss is multiplied
    up before the backward pass and the gradients divided back before the step (steps with inf/nan gradients
    are skipped and the scale lowered). Disabled, a pass-through, for bf16 (fp32's exponent range) and fp32.
    Use: scaler.scale(loss).backward(); scaler.unscale_(opt); clip; scaler.step(opt); scaler.update()."""
    enabled = resolve_dtype(device, dtype_name) == torch.float16
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


# --------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_at(step, max_steps, base_lr, warmup_steps=0, min_lr_ratio=0.1):
    """Linear warmup to base_lr over warmup_steps, then cosine decay to base_lr * min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def make_optimizer(groups, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, muon_params=()):
    """AdamW over named parameter groups [(name, params, lr), ...]; with muon_params, Muon for those.

    A group with lr 0 is frozen: requires_grad=False and left out. Weight decay applies to matrices (>= 2-D:
    linear weights, token and position embeddings) and not to vectors (biases, norm gains), as in GPT-2/nanoGPT.
    muon_params (weight matrices, e.g. every nn.Linear weight) are updated by Muon at their group's lr, the
    rest by AdamW, all in one nanovlm.muon.Muon optimizer. Every param group keeps "base_lr", so set_lr scales
    all groups by the same schedule.
    """
    muon_ids = {id(p) for p in muon_params}
    param_groups = []
    for name, params, lr in groups:
        params = list(params)
        if lr == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        params = [p for p in params if p.requires_grad]
        matrices = [p for p in params if id(p) in muon_ids]
        decay = [p for p in params if p.dim() >= 2 and id(p) not in muon_ids]
        no_decay = [p for p in params if p.dim() < 2 and id(p) not in muon_ids]
        for suffix, ps, wd in ((f"{name}_muon", matrices, weight_decay), (name, decay, weight_decay),
                               (f"{name}_no_decay", no_decay, 0.0)):
            if ps:
                param_groups.append({"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": suffix})
                if muon_ids:
                    param_groups[-1]["muon"] = ps is matrices
    if not param_groups:
        raise ValueError("make_optimizer: no trainable parameters (every group has lr 0?)")
    if muon_ids:
        return Muon(param_groups, betas=betas, eps=eps)
    all_cuda = all(p.is_cuda for g in param_groups for p in g["params"])
    kwargs = {"fused": True} if all_cuda else {"foreach": True}  # one kernel for all params on GPU
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, **kwargs)


def set_lr(optimizer, step, max_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Apply the schedule to every group (each from its own base_lr); returns the first group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, max_steps, g["base_lr"], warmup_steps, min_lr_ratio)
    return optimizer.param_groups[0]["lr"]


def check_finite(loss, step):
    """Stop on a NaN/inf loss instead of training on garbage."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}: lower --lr, check the data, or try --dtype fp32")
    return value


def check_losses(losses, step, dist):
    """The mean over processes of the step losses logged since the last check (device tensors, read here in one
    sync instead of one per step), after checking each is finite: a NaN names the first step that had it."""
    if not losses:
        return float("nan")
    values = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in losses]).float()  # (n,)
    if dist.ddp:
        torch_dist.all_reduce(values)
        values /= dist.world_size
    values = values.tolist()
    for k, v in enumerate(values):
        check_finite(v, step - len(values) + 1 + k)
    return sum(values) / len(values)


def global_counts(counts, dist):
    """Per-micro-batch counts [{name: int}, ...] -> {name: total over the step's micro-batches and every process,
    divided by the number of processes}. Each process divides its summed loss by these; DDP's gradient average
    over processes then gives (sum over the global batch) / (count over the global batch)."""
    names = list(counts[0])
    totals = [float(sum(c[k] for c in counts)) for k in names]
    if not dist.ddp:
        return {k: max(v, 1.0) for k, v in zip(names, totals)}
    totals = torch.tensor(totals, dtype=torch.float32, device=dist.device)
    torch_dist.all_reduce(totals)   # stays on the device: the loss divides by it without a host sync
    return dict(zip(names, (totals.clamp(min=1.0) / dist.world_size).unbind()))


# --------------------------------------------------------------------------------------------------------------
# Data order: stateless, so resume is exact and DDP == gradient accumulation


GROUP_WINDOW = 64   # length grouping sorts windows of this many global batches (HF's group_by_length uses 50)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_samples, seed, epoch, global_batch=None, lengths=None):
    """Epoch `epoch`'s order of the samples: a permutation seeded by (seed, epoch). With `lengths` (a tuple,
    one token count per sample), samples of similar length share a batch, so little of a batch is padding: the
    permutation is cut into windows of GROUP_WINDOW global batches, each window sorted by length and cut into
    global batches, and the order of all those batches shuffled. Each sample still comes once per epoch."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_samples)
    if lengths is None:
        return perm
    lengths = np.asarray(lengths)
    window = GROUP_WINDOW * global_batch
    groups = []
    for w in range(0, n_samples, window):
        chunk = perm[w:w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        groups += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(groups))
    return np.concatenate([groups[i] for i in order])


def batch_indices(step, micro_step, rank, world_size, micro_batch, accum, n_samples, seed, lengths=None):
    """Sample indices for one micro-batch.

    The samples form an infinite stream: epoch e is a permutation seeded by (seed, e). Optimizer step `step`
    consumes the next global batch of micro_batch * accum * world_size samples, and this call returns slice
    number micro_step * world_size + rank of it. So 2 ranks x 1 micro-step read what 1 rank x 2 micro-steps read.
    lengths (a tuple of token counts, one per sample) groups samples of similar length (_epoch_order).
    """
    global_batch = micro_batch * accum * world_size
    start = step * global_batch + (micro_step * world_size + rank) * micro_batch
    positions = np.arange(start, start + micro_batch)
    out = np.empty(micro_batch, dtype=np.int64)
    for epoch in np.unique(positions // n_samples):
        sel = positions // n_samples == epoch
        order = _epoch_order(n_samples, seed, int(epoch), global_batch if lengths else None, lengths)
        out[sel] = order[positions[sel] % n_samples]
    return out.tolist()


# --------------------------------------------------------------------------------------------------------------
# RNG states


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states():
    """Every rank's RNG state as a list indexed by rank (a collective: call on all ranks)."""
    if not torch_dist.is_initialized():
        return [rng_state()]
    states = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(states, rng_state())
    return states


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: a directory, swapped in atomically


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, model, config, *, optimizer=None, step=None, rng_states=None, extra=None, files=None):
    """Write checkpoint directory `path`: config.json, model.safetensors, train_state.pt (if optimizer), files.

    config: JSON-able dict (include "model_type"). files: {name: str contents or source Path} (vocab, tokenizer).
    Written into a temp directory beside `path`, fsynced, then swapped in with renames: the old checkpoint is
    moved aside to `.NAME.old` before the new one takes its name and is deleted only after. A crash leaves
    either the old or the new checkpoint (load_checkpoint falls back to `.NAME.old` if `path` is missing).
    Call on the main rank only; gather rng_states on all ranks first (gather_rng_states) when using DDP.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(unwrap(model), str(tmp / "model.safetensors"))  # handles tied weights (stored once)
    if optimizer is not None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_states or [rng_state()],
                 "extra": extra or {}}
        torch.save(state, tmp / "train_state.pt")
    for name, content in (files or {}).items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp / name)
        else:
            (tmp / name).write_text(content)
    if path.is_dir():  # keep what else lives there (metrics.jsonl, plots, logs) across the swap
        for f in path.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path):
    """The directory to read: `path`, or the old copy a crash between the two renames left behind."""
    path = Path(path)
    if not path.exists() and (path.parent / f".{path.name}.old").exists():
        return path.parent / f".{path.name}.old"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'config.json'})")
    return path


def read_config(path):
    return weights.read_config(checkpoint_dir(path))


def load_checkpoint(path, model, optimizer=None, rank=0, device="cpu"):
    """Load weights into `model`; with an optimizer also its state and this rank's RNG state.

    Returns the train state dict ({"step", "extra", ...}) or {} when only weights were asked for.
    """
    path = checkpoint_dir(path)
    load_model(unwrap(model), str(path / "model.safetensors"), device=str(device))
    weights.check_finite(unwrap(model).state_dict(), path / "model.safetensors")
    if optimizer is None:
        return {}
    if not (path / "train_state.pt").exists():
        raise FileNotFoundError(f"{path} has no train_state.pt to resume from (use --init-from for weights only)")
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state


# --------------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl + plots


class MetricsLogger:
    """Append one JSON line per log() to out_dir/metrics.jsonl; plot(keys) draws them vs step (main rank only).

    On resume pass resume_step: earlier lines up to that step are kept, later ones (from the lost run) dropped.
    """

    def __init__(self, out_dir, is_main=True, resume_step=None):
        self.is_main, self.path, self.rows = is_main, Path(out_dir) / "metrics.jsonl", []
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, step, **metrics):
        if not self.is_main:
            return
        row = {"step": step, **{k: float(v) if isinstance(v, (int, float, np.floating)) or torch.is_tensor(v)
                                else v for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, keys, filename, title=None, logy=False):
        """One PNG with a line per key (only rows that have that key), x = step."""
        if not self.is_main:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(title or ", ".join(keys))
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.parent / filename, dpi=100)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Throughput

# Dense bf16 peak FLOP/s (no sparsity, FP32 accumulate), from the vendors' datasheets. Matched against the device
# name in this order, so the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L40" before
# "L4"). A name matching none of them gives no MFU rather than a wrong one.
PEAK_BF16_FLOPS = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
                   ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
                   ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None (CPU, unknown GPU)."""
    if not str(device).startswith("cuda"):
        return None
    return peak_flops_of(torch.cuda.get_device_name(torch.device(device)))


def peak_flops_of(name):
    """The peak for a device name (torch.cuda.get_device_name), or None when the table does not know it."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", name):
            return flops
    return None


def flops_per_token(n_params, n_layers, seq_len, d_model):
    """nanoGPT's estimate of training FLOPs per token for a decoder whose every weight trains on every token:
    6N for the matmuls (2 forward + 4 backward per weight) plus 12 * L * T * d for attention scores and weighted
    sums at sequence length T (PaLM appendix B; the full T x T, as nanoGPT's estimate_mfu). train_gpt.py uses
    it (fixed-length sequences); the VLM counts what runs instead (vlm_train.train_flops)."""
    return 6 * n_params + 12 * n_layers * seq_len * d_model


def mfu(flops_per_s, device):
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s (counted as in vlm_train.train_flops) over the device's
    peak, or None where no peak is known (CPU)."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_s / peak
