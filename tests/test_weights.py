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
