"""The GPT in the Hugging Face format: transformers' GPT2LMHeadModel and tokenizer are the reference."""

import json

import pytest
import torch

from nanovlm import codebook
from nanovlm import train_utils as tu
from nanovlm.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

SEQ = "<IMG> c_3 c_0 c_7 c_7 c_1 </IMG> <CLS> <CLS_4> <EOS>"


def random_gpt(vocab, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorm gains 1, biases 0) so each one matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_gives_the_same_logits_and_greedy_tokens(tmp_path, bias):
    vocab = codebook.build_vocab(8)
    model = random_gpt(vocab, bias)
    model.save_hf(tmp_path, **codebook.HF_TOKEN_IDS)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.eos_token_id == codebook.EOS and hf.config.pad_token_id == codebook.PAD
    x = torch.tensor([codebook.encode(SEQ, vocab), codebook.encode(SEQ.replace("c_3", "c_5"), vocab)])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits                                     # (B, T, V)
    assert (ours - theirs).abs().max() <= 1e-5
    prompt = x[:, :8]                                                                 # up to <CLS>
    new = model.generate(prompt, 4, temperature=0)
    ref = hf.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=codebook.PAD)
    assert new.tolist() == ref[:, 8:].tolist()


def test_tokenizer_json_encodes_to_the_training_ids(tmp_path):
    from tokenizers import Tokenizer
    vocab = codebook.build_vocab(8)
    codebook.save_tokenizer(vocab, tmp_path)
    ids = codebook.encode(SEQ, vocab)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(SEQ).ids == ids
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok(SEQ)["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True) == "c_3 c_0 c_7 c_7 c_1 <CLS_4>"
    assert tok.eos_token_id == codebook.EOS and tok.pad_token_id == codebook.PAD
    with pytest.raises(Exception):  # no unknown-token fallback: a typo is an error, as in codebook.encode
        tok("<IMG> c_99")


def test_sample_gpt_exports_an_existing_checkpoint(tmp_path):
    import sample_gpt
    vocab = codebook.build_vocab(8)
    model = random_gpt(vocab, bias=True)
    tu.save_checkpoint(tmp_path / "ckpt", model, {"model_type": "gpt", "gpt": vars(model.config), "max_length": 16},
                       files={"vocab.json": json.dumps(vocab)})
    sample_gpt.main(["--ckpt", str(tmp_path / "ckpt"), "--export-hf", str(tmp_path / "hf"), "--device", "cpu"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    x = torch.tensor([tok(SEQ)["input_ids"]])
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max() <= 1e-5
