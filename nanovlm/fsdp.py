"""FSDP2: shard a model's parameters, gradients and optimizer state across processes, for models whose DDP
replicas do not fit (a 7B model with AdamW needs ~16 bytes a parameter: 112 GB, more than one 80 GB GPU).

    model = shard(model, [*model.vision.layers, *model.lm.layers], torch.bfloat16)   # then build the optimizer
    save(out_dir, model, optimizer, config, step, files)    # on every process; atomic
    state = load(out_dir, model, optimizer, rank)           # --resume, on every process

DDP keeps a full copy of the model on every GPU and all-reduces gradients. FSDP (fully sharded data parallel)
keeps 1/W of each parameter on each of W processes: before a block runs, its parameters are all-gathered;
after, the full copies are freed; in the backward pass the gradients are reduce-scattered, so each process
ends with the gradient of its own shard, and the optimizer updates only that shard. Memory per GPU falls from
16N bytes (fp32 weights, gradients, Adam's two moments) to 16N / W plus one block's full weights at a time.

torch.distributed.fsdp.fully_shard (FSDP2) does this per module: each decoder and ViT block is one unit (its
all-gather overlaps the previous block's compute), then the root takes what is left (embeddings, norms, the
projector, the head). Parameters become DTensors: sharded tensors that know their global shape.

Mixed precision: the sharded (master) weights stay fp32; MixedPrecisionPolicy casts the gathered copies to
bf16 for the forward and backward pass, and reduces gradients in fp32.

Gradient accumulation: set_requires_gradient_sync(False) on every micro-batch but the last skips the
reduce-scatter (train_utils.sync_context does it), as DDP's no_sync does.

Checkpoints: each process writes its own shards of the model and optimizer state (torch.distributed.checkpoint,
"DCP") into train_state.dcp/, which --resume reads back into the same number of processes or another; and the
full weights are gathered on the main process and written as the usual model.safetensors, so sample.py,
--init-from and every other reader of a checkpoint need not know FSDP was used. The directory is written
atomically, as every checkpoint (train_utils.save_checkpoint).

Muon orthogonalises whole matrices, which a process holding a shard does not have: under FSDP the optimizer is
AdamW. LoRA trains few parameters and fits DDP: it is not combined with FSDP here.
"""

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from nanovlm import train_utils as tu


def shard(model, blocks, param_dtype=None):
    """fully_shard each block, then the model (the root); in place, returns the model. param_dtype: the dtype of
    the gathered copies the blocks compute with (bf16, or None for fp32); gradients are reduced in fp32."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # generate() is a forward pass FSDP would not see (it is not forward()): registered, it gathers the root's
    # weights (embeddings, norms, projector, head) around it, as forward() does. Every process must call it, with
    # as many decoding steps (vlm.all_done).
    for method in ("generate", "generate_numbers"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def is_sharded(model):
    return hasattr(model, "set_requires_gradient_sync")   # what fully_shard adds to a module


def full_state_dict(model):
    """The full (unsharded) weights on the main process's CPU, {} elsewhere. A collective: call on every process."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(path, model, optimizer, config, step, files=None, rng_states=None, extra=None, names=None):
    """Atomic checkpoint of a sharded model (call on every process): train_state.dcp/ holds every process's
    shards of the model and optimizer state, model.safetensors the full weights (written by the main process),
    under names[k] instead of the parameter names when given (a Qwen2.5-VL checkpoint: the hub's)."""
    path = Path(path)
    staging = path.parent / f".{path.name}.dcp.tmp"   # on a file system every process sees (multi-node too)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging))
    weights = full_state_dict(model)
    if names is not None:
        weights = {names[k]: v for k, v in weights.items()}
    if dist.get_rank() == 0:
        tu.save_checkpoint(path, model, config, step=step, rng_states=rng_states, extra=extra, files=files,
                           state_dict=weights, dirs={"train_state.dcp": staging})
    dist.barrier()


def load(path, model, optimizer, rank=0):
    """Resume a sharded model and its optimizer from a checkpoint written by save() (call on every process).
    Returns the train state ({"step", "extra", ...}), and restores this process's RNG state."""
    path = tu.checkpoint_dir(path)
    if not (path / "train_state.dcp").is_dir():
        raise FileNotFoundError(f"{path} has no train_state.dcp/ (sharded state): was it written with --fsdp? "
                                "Resume a DDP run without --fsdp, or start from its weights with --init-from")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / "train_state.dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    rngs = train_state["rng"]
    tu.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return train_state
