"""sample.py in VLM mode: the streamed answer is the model's greedy answer, and --eval scores a dataset."""
import json

import numpy as np
import torch
from PIL import Image

import sample
from conftest import greedy_by_full_forward
from nanovlm.projector import ProjectorConfig
from nanovlm.qwen2 import Qwen2Config
from nanovlm.siglip import SiglipConfig
from nanovlm.tokenizer import train_tiny_tokenizer
from nanovlm.vlm import VLM, VLMConfig


def make_ckpt(path):
    tok = train_tiny_tokenizer(["What colour is the circle?", "red green blue", "a b c d e f"], vocab_size=300)
    torch.manual_seed(0)
    cfg = VLMConfig(lm=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
                    vision=SiglipConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=2),
                    projector=ProjectorConfig(shuffle_factor=2), image_token_id=tok.image_pad,
                    stop_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.endoftext, system_prompt=None)
    model = VLM(cfg).eval()
    with torch.no_grad():   # special tokens get logit 0 (tied head), below the best ordinary one: a real answer
        for t in (tok.endoftext, tok.im_start, tok.im_end, tok.vision_start, tok.vision_end, tok.image_pad, tok.num):
            model.lm.embed_tokens.weight[t] = 0
    model.save_pretrained(path)
    tok.save(str(path))
    return model, tok


def test_prompt_about_an_image_streams_the_greedy_answer(tmp_path, capsys):
    model, tok = make_ckpt(tmp_path / "ckpt")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--image", str(image), "--prompt", "What colour is the circle?",
                 "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out
    from nanovlm.data import load_image
    ids, _ = tok.encode_chat([{"role": "user", "content": "<image>\nWhat colour is the circle?"}], 4,
                             add_generation_prompt=True, system=None)
    tokens = greedy_by_full_forward(model, ids, load_image(image, 32, "x")[None], 6)
    assert len(tokens) == 6 and printed == tok.decode(tokens, skip_special_tokens=True) + "\n"


def test_eval_mode_reports_per_question_type(tmp_path, capsys):
    make_ckpt(tmp_path / "ckpt")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "qtype": "colour",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
            {"qtype": "text", "conversations": [{"from": "human", "value": "Say a"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--eval", str(tmp_path / "val.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "2 samples" in out and "colour" in out and "text" in out and "all" in out
