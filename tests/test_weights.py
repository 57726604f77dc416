"""Bad checkpoints and offline hub ids give errors that say what is wrong and where."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm.qwen2 import Qwen2, Qwen2Config
from nanovlm.siglip import SiglipViT
from nanovlm.weights import resolve_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    model = Qwen2(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \(1\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        Qwen2.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors.*rotary_emb\.inv_freq"):
        Qwen2.from_pretrained(ckpt)


def test_wrong_shape_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wrong shapes.*mlp\.gate_proj\.weight: file \(48, 32\) vs model \(64, 32\)"):
        Qwen2.from_pretrained(ckpt)


def test_corrupt_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        Qwen2.from_pretrained(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        Qwen2.from_pretrained(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        Qwen2.from_pretrained(ckpt)


def test_missing_shard(tmp_path):
    Qwen2(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path, max_shard_bytes=8000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="listed in model.safetensors.index.json but missing"):
        Qwen2.from_pretrained(tmp_path)


def test_offline_repo_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConnectionError, match="could not be downloaded from the Hugging Face hub"):
        Qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ConnectionError, match="Hugging Face hub"):
        SiglipViT.from_pretrained("google/siglip-base-patch16-224")


def test_not_a_path_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "dir"))
    f = tmp_path / "file.bin"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        resolve_checkpoint(f)


def test_hub_id_reads_the_local_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache (what a download leaves behind), offline too: the layout
    models--OWNER--NAME/snapshots/COMMIT/ with refs/main naming the commit."""
    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

    from nanovlm.qwen2 import Qwen2
    repo = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    hf = Qwen2ForCausalLM(HFQwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    hf.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants   # read at import: point it at this cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = Qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5)


def test_downloads_once_per_machine(monkeypatch):
    """Only each machine's first process (local rank 0) downloads; every process then waits at the barrier."""
    from nanovlm import vlm_train
    from nanovlm.train_utils import Dist
    fetched, barriers = [], []
    monkeypatch.setattr(vlm_train, "resolve_checkpoint", fetched.append)
    monkeypatch.setattr(vlm_train.tu, "barrier", lambda: barriers.append(1))
    vlm_train.fetch_once_per_machine(["Qwen/a", "google/b"], Dist(rank=8, local_rank=0, world_size=16))
    assert fetched == ["Qwen/a", "google/b"]
    vlm_train.fetch_once_per_machine(["Qwen/a", "google/b"], Dist(rank=9, local_rank=1, world_size=16))
    assert fetched == ["Qwen/a", "google/b"] and len(barriers) == 2
