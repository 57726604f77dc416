"""Checkpoints on disk: safetensors files, sharded indexes, config.json, and the Hugging Face hub.

A model file says which official key goes to which of its parameters (`hf_key_map()`: ours -> official);
this file does the generic part, strictly: a missing, unexpected or mis-shaped tensor, or one holding NaN/inf, is
an error that names it, never a warning (a half-loaded model still runs and silently produces garbage).

    ckpt = resolve_checkpoint("Qwen/Qwen2.5-0.5B-Instruct")   # a local directory, or a hub download
    config = read_config(ckpt)
    tensors = read_safetensors(ckpt)                          # {official key: tensor}
    load_mapped(model, tensors, model.hf_key_map(), ckpt)
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"]


def resolve_checkpoint(path_or_repo_id, allow_patterns=WEIGHT_FILES + TOKENIZER_FILES):
    """A local checkpoint directory as is, or a hub repo id downloaded (only the files we read) and cached."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; a checkpoint is a directory with config.json and *.safetensors")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo_id)):
        raise FileNotFoundError(f"no checkpoint directory {path}, and {path_or_repo_id!r} is not a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface-hub is a dependency
        raise ImportError("downloading from the hub needs huggingface-hub: pip install huggingface-hub") from e
    try:
        return Path(snapshot_download(repo_id=str(path_or_repo_id), allow_patterns=allow_patterns))
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{path_or_repo_id!r}: no such local directory, and no such repository on the "
                                f"Hugging Face hub (or it is private/gated: log in with `hf auth login`)") from e
    except LocalEntryNotFoundError as e:
        raise ConnectionError(f"{path_or_repo_id!r} is not a local directory and could not be downloaded from the "
                              f"Hugging Face hub: no connection (or HF_HUB_OFFLINE=1) and it is not in the local "
                              f"cache. Download it once with internet, or pass a local checkpoint directory.") from e
    except Exception as e:  # network errors come in many types; keep the original attached
        raise ConnectionError(f"could not download {path_or_repo_id!r} from the Hugging Face hub: "
                              f"{type(e).__name__}: {e}") from e


def read_config(ckpt_dir):
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory needs a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_safetensors(ckpt_dir):
    """All tensors of a checkpoint, single-file (model.safetensors) or sharded (model.safetensors.index.json)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = sorted(set(weight_map.values()))
    elif (ckpt_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{ckpt_dir} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = ckpt_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
        try:
            part = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        if weight_map is not None:
            stray = [k for k in part if weight_map.get(k) != name]
            if stray:
                raise ValueError(f"{path} holds tensors its index puts elsewhere: {stray[:5]}")
        tensors.update(part)
    if weight_map is not None and set(weight_map) != set(tensors):
        raise ValueError(f"{index}: tensors listed but not found in the shards: {sorted(set(weight_map) - set(tensors))[:5]}")
    return tensors


def load_mapped(module, tensors, key_map, where, ignore=(), dtype=None):
    """Copy `tensors` (official names) into `module` through key_map {our name: official name}.

    ignore: official keys (regexes) that exist in the file but that this module does not use on purpose
    (e.g. SigLIP's text tower). Everything else must match exactly, in name and shape.
    """
    ours = module.state_dict()
    if set(key_map) != set(ours):  # a bug in a key map, not in the file
        raise KeyError(f"key map of {type(module).__name__} does not cover its parameters: "
                       f"{sorted(set(ours) ^ set(key_map))[:5]}")
    wanted = {official: mine for mine, official in key_map.items()}
    missing = sorted(k for k in wanted if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in wanted and not any(re.fullmatch(p, k) for p in ignore))
    wrong_shape = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(ours[wanted[k]].shape)}"
                   for k in wanted if k in tensors and tensors[k].shape != ours[wanted[k]].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {wrong_shape[:8]}")
    if problems:
        raise ValueError(f"checkpoint {where} does not fit {type(module).__name__}: " + "; ".join(problems))
    check_finite({k: tensors[k] for k in wanted}, where)
    state = {mine: tensors[official].to(dtype or ours[mine].dtype) for mine, official in key_map.items()}
    # assign: a module built on the meta device (no memory, no init) takes the loaded tensors as its parameters.
    module.load_state_dict(state, strict=True, assign=any(p.is_meta for p in module.parameters()))
    return module


def check_finite(tensors, where):
    """A NaN or inf in a weight (a run saved after its loss diverged, a corrupt file) makes every output garbage
    (VLM answers come out empty) without any error, so loading refuses it, naming the tensors."""
    bad = [(k, int((~torch.isfinite(t)).sum()), t.numel()) for k, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        names = ", ".join(f"{k} ({n} of {total})" for k, n, total in bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise ValueError(f"checkpoint {where}: {len(bad)} tensor(s) hold NaN/inf values: {names}. The weights are "
                         "broken (saved after the loss diverged?): load an earlier checkpoint")


def save_mapped(module, key_map, out_dir, max_shard_bytes=None):
    """Write `module` with official key names: model.safetensors, or shards + index when over max_shard_bytes."""
    state = module.state_dict()
    tensors = {key_map[k]: t.detach().contiguous().cpu() for k, t in state.items()}
    save_safetensors(tensors, out_dir, max_shard_bytes)


def save_safetensors(tensors, out_dir, max_shard_bytes=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        _atomic_save(tensors, out_dir / "model.safetensors")
        return
    shards, size = [{}], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))


def _atomic_save(tensors, path):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_dtype(name):
    """'bfloat16' / torch.bfloat16 / None -> torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None
