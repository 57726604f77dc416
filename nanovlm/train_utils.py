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
import shutil
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.utils.checkpoint
from safetensors.torch import load_file, load_model, save_file, save_model

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
        # fp32 matrix products on tensor cores in TF32 (10-bit mantissa, fp32 range): what stays fp32 under bf16
        # autocast, and whole fp32 runs, go several times faster for a rounding far below training noise.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Under torchrun the process group starts even for one process, so `torchrun --nproc_per_node=1` runs the DDP
    # code path a multi-GPU run takes (benchmarks/gpu_check.py measures it); a plain `python` run stays without.
    ddp = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
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
    """Gradient accumulation: DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-step
    (sync=True); the earlier ones only accumulate locally."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def checkpoint_blocks(blocks):
    """Activation checkpointing: each block keeps only its input for the backward pass and recomputes the rest
    there (one more forward pass per block, ~1/3 more compute), instead of keeping every intermediate activation.
    Done by replacing each block's forward with a checkpointed call of it, so parameter names do not change."""
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


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


def check_finite(loss, step, samples=None):
    """Stop on a NaN/inf loss instead of training on garbage; samples: the names of the step's samples."""
    value = float(loss)
    if not math.isfinite(value):
        named = f" (samples: {_first(samples)})" if samples else ""
        raise FloatingPointError(f"loss is {value} at step {step}{named}: check those samples, lower --lr, "
                                 "or try --dtype fp32")
    return value


def check_losses(losses, step, dist, samples=None):
    """The mean over processes of the step losses logged since the last check (device tensors, read here in one
    sync instead of one per step), after checking each is finite: a NaN names the first step that had it and,
    given samples (one list of sample names per step, kept beside losses), that step's samples on the process
    whose own loss was not finite (the others say so)."""
    if not losses:
        return float("nan")
    mine = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in losses]).float()  # (n,)
    values = mine.clone()
    if dist.ddp:
        torch_dist.all_reduce(values)
        values /= dist.world_size
    values, mine = values.tolist(), mine.tolist()
    first = step - len(values) + 1   # the step of values[0]
    for k, v in enumerate(values):
        if not math.isfinite(v):
            names = samples and (samples[k] if not math.isfinite(mine[k]) else ["those of another process"])
            check_finite(v, first + k, names)
    return sum(values) / len(values)


def _first(names, n=8):
    """The first n names, and how many more."""
    names = list(dict.fromkeys(names))
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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


def token_batch_indices(step, micro_step, rank, world_size, accum, lengths, seed, budget):
    """Sample indices for one micro-batch of at most `budget` tokens (--batch-tokens), instead of a fixed count.

    Each epoch's permutation (as in batch_indices) is cut, in order, into micro-batches whose lengths add up to
    at most `budget`; the micro-batches of all epochs form one stream, and step `step` takes the next
    accum * world_size of them, this call number micro_step * world_size + rank. A pure function of its
    arguments, like batch_indices: resume is exact and 2 ranks read what 1 rank reads in 2 micro-steps.
    lengths: a tuple of token counts, one per sample."""
    k = (step * accum + micro_step) * world_size + rank
    epoch = 0
    while k >= _n_token_batches(lengths, seed, epoch, budget):
        k -= _n_token_batches(lengths, seed, epoch, budget)
        epoch += 1
    return _token_batches(lengths, seed, epoch, budget)[k]


@functools.lru_cache(maxsize=4)
def _token_batches(lengths, seed, epoch, budget):
    batches, current, used = [], [], 0
    for i in _epoch_order(len(lengths), seed, epoch).tolist():
        if lengths[i] > budget:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit --batch-tokens {budget}")
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + [current] if current else batches


@functools.lru_cache(maxsize=None)
def _n_token_batches(lengths, seed, epoch, budget):
    return len(_token_batches(lengths, seed, epoch, budget))


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


def save_checkpoint(path, model, config, *, optimizer=None, step=None, rng_states=None, extra=None, files=None,
                    state_dict=None, dirs=None):
    """Write checkpoint directory `path`: config.json, model.safetensors, train_state.pt (if resumable), files.

    config: JSON-able dict (include "model_type"). files: {name: str contents or source Path} (vocab, tokenizer).
    state_dict: the weights to write instead of model's own (FSDP: the full weights gathered from the shards);
    dirs: {name: a directory already written elsewhere, moved in} (FSDP: the sharded train state, nanovlm/fsdp.py).
    Written into a temp directory beside `path`, fsynced, then swapped in with renames: the old checkpoint is
    moved aside to `.NAME.old` before the new one takes its name and is deleted only after. A crash leaves
    either the old or the new checkpoint: a crash between the two renames leaves no `path`, and
    checkpoint_dir reads, recover_checkpoint restores, the one left beside it (_interrupted_swap).
    Call on the main rank only; gather rng_states on all ranks first (gather_rng_states) when using DDP.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old, tmp = _swap_leftovers(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if state_dict is None:
        save_model(unwrap(model), str(tmp / "model.safetensors"))  # handles tied weights (stored once)
    else:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    if optimizer is not None or dirs:   # a resumable checkpoint (FSDP: the optimizer's shards are in dirs)
        state = {"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "rng": rng_states or [rng_state()], "extra": extra or {}}
        torch.save(state, tmp / "train_state.pt")
    for name, src in (dirs or {}).items():
        os.rename(src, tmp / name)
    for name, content in (files or {}).items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp / name)
        else:
            (tmp / name).write_text(content)
    if path.is_dir():  # keep what else lives there (metrics.jsonl, plots, logs) across the swap
        for f in path.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _swap_leftovers(path):
    """(.NAME.old, .NAME.tmp) beside `path`."""
    return path.parent / f".{path.name}.old", path.parent / f".{path.name}.tmp"


def _interrupted_swap(path):
    """The checkpoint a crash between save_checkpoint's two renames left behind, or None when `path` is whole.
    Only that crash leaves `path` missing with `.NAME.old` beside it, and save_checkpoint writes and fsyncs
    `.NAME.tmp` completely before the first rename, so then `.tmp` is the newer, complete checkpoint (with the
    metrics.jsonl of every step up to it); `.old` serves if `.tmp` is gone."""
    old, tmp = _swap_leftovers(path)
    if path.exists() or not old.exists():
        return None
    return tmp if (tmp / "config.json").exists() else old


def recover_checkpoint(path):
    """Finish a checkpoint swap a crash interrupted (see _interrupted_swap): rename the checkpoint it left back
    to `path`, so a resumed run continues from it and keeps its metrics.jsonl (call on the main rank only)."""
    path = Path(path)
    left = _interrupted_swap(path)
    if left is not None:
        print(f"{path}: recovered the checkpoint an interrupted save left in {left.name}")
        os.rename(left, path)
        _fsync_dir(path.parent)
    return path


def checkpoint_dir(path):
    """The directory to read: `path`, or the checkpoint a crash between the two renames left behind."""
    path = Path(path)
    path = _interrupted_swap(path) or path
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'config.json'})")
    return path


def read_config(path):
    return weights.read_config(checkpoint_dir(path))


def load_checkpoint(path, model, optimizer=None, rank=0, device="cpu", names=None):
    """Load weights into `model`; with an optimizer also its state and this rank's RNG state. names: {parameter
    name: name in the file} when the file uses other names (a Qwen2.5-VL checkpoint: the hub's).

    Returns the train state dict ({"step", "extra", ...}) or {} when only weights were asked for.
    """
    path = checkpoint_dir(path)
    if names is None:
        load_model(unwrap(model), str(path / "model.safetensors"), device=str(device))
        weights.check_finite(unwrap(model).state_dict(), path / "model.safetensors")
    else:   # strict, by name and shape, with the same checks as an official checkpoint
        weights.load_mapped(unwrap(model), load_file(path / "model.safetensors", device=str(device)), names,
                            path / "model.safetensors")
    if optimizer is None:
        return {}
    if not (path / "train_state.pt").exists():
        raise FileNotFoundError(f"{path} has no train_state.pt to resume from (use --init-from for weights only)")
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, IndexError) as e:   # other parameter groups: another optimizer, LoRA, head
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path / 'train_state.pt'}: its optimizer state does not fit this run's optimizer "
                         f"({first}): resume with the flags that started the run ({path / 'args.json'})") from None
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C: stop at the end of a step, with a checkpoint


class StopOnCtrlC:
    """Turns the first Ctrl-C (SIGINT) into a flag the loop reads once per step, so it can save a checkpoint at
    the end of the step and stop (raise Interrupted); a second Ctrl-C aborts at once. restore() gives Ctrl-C
    back its usual meaning (after the loop).

        stop = StopOnCtrlC(dist, out_dir)
        for step in ...:
            ...one optimizer step...
            stopping = stop.requested()
            if stopping or ...: save_checkpoint(...)
            if stopping: raise Interrupted(step + 1, out_dir)
        stop.restore()

    With several processes every one must stop after the same step (saving is collective): requested() takes
    the flag of any process (one all_reduce of one number, over a CPU gloo group, so the GPU never waits).
    torchrun passes a Ctrl-C on to every worker and kills them after its --shutdown-timeout (30 s by default):
    raise it when a step plus a save take longer."""

    def __init__(self, dist, out_dir):
        self.flag, self.out_dir, self.is_main = False, Path(out_dir), dist.is_main
        self.group = torch_dist.new_group(backend="gloo") if dist.ddp else None
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:   # not the main thread (signal handlers live there): Ctrl-C keeps its usual meaning
            self.previous = None

    def _handler(self, signum, frame):
        if self.flag:
            ckpt = (f"the last checkpoint is in {self.out_dir}" if (self.out_dir / "config.json").exists()
                    else "no checkpoint was saved")
            raise KeyboardInterrupt(f"aborted by a second Ctrl-C; {ckpt}")
        self.flag = True
        if self.is_main:
            print("\nCtrl-C: stopping at the end of this step, with a checkpoint (Ctrl-C again: abort at once)",
                  file=sys.stderr, flush=True)

    def requested(self):
        if self.group is None:
            return self.flag
        # self.flag stays this process's own: the same Ctrl-C may reach it a moment after another's, and must
        # not count as the second one
        flag = torch.tensor([float(self.flag)])
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Interrupted(KeyboardInterrupt):
    """The loop stopped for a Ctrl-C after saving its checkpoint; run_cli prints it as one line (exit code 130)."""

    def __init__(self, step, out_dir):
        super().__init__(f"stopped after step {step}, checkpoint saved in {out_dir}: add --resume to continue")


# --------------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl + plots


class MetricsLogger:
    """Append one JSON line per log() to out_dir/metrics.jsonl; plot(keys) draws them vs step (main rank only).

    On resume pass resume_step: earlier lines up to that step are kept, later ones (from the lost run) dropped.
    wandb_project: also log every row to Weights & Biases (pip install wandb; WANDB_MODE=offline works without a
    network); the run's id is kept in out_dir/wandb_run_id, so --resume continues the same run. wandb is imported
    only when asked for.
    """

    def __init__(self, out_dir, is_main=True, resume_step=None, wandb_project=None, config=None):
        self.is_main, self.path, self.rows = is_main, Path(out_dir) / "metrics.jsonl", []
        self.wandb = None
        if not is_main:
            return
        if wandb_project:
            self.wandb = _wandb_run(wandb_project, Path(out_dir), config, resume=resume_step is not None)
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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

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


def metrics_rows(out_dir):
    """The number of rows in out_dir/metrics.jsonl. A checkpoint records it, so that a resume can forget the rows
    a lost run logged after that checkpoint (trim_metrics): rows are logged at a step's index by one loop and at
    the count of steps done by another, so their step fields alone cannot tell."""
    path = Path(out_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines(keepends=True)) if path.exists() else 0


def trim_metrics(out_dir, rows):
    """Keep the first `rows` rows of out_dir/metrics.jsonl (a half-written last line goes too)."""
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        lines = [line for line in path.read_text().splitlines(keepends=True)[:rows] if line.endswith("\n")]
        path.with_suffix(".tmp").write_text("".join(lines))
        os.replace(path.with_suffix(".tmp"), path)


def _wandb_run(project, out_dir, config, resume):
    try:
        import wandb
    except ImportError:
        raise ImportError("--wandb needs the wandb package: pip install wandb (or pip install -e '.[wandb]')") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), config=config,
                      name=out_dir.name)
