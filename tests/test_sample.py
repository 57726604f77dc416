"""sample.py in VLM mode: the streamed answer is the model's greedy answer, and --eval scores a dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import greedy_by_full_forward, tiny_config
from nanovlm.tokenizer import train_tiny_tokenizer
from nanovlm.vlm import VLM


def make_ckpt(path):
    tok = train_tiny_tokenizer(["What colour is the circle?", "red green blue", "a b c d e f"], vocab_size=300)
    torch.manual_seed(0)
    cfg = tiny_config(lm=dict(vocab_size=len(tok)), vision=dict(num_hidden_layers=1, num_attention_heads=2),
                      image_token_id=tok.image_pad, stop_token_ids=(tok.im_end, tok.endoftext),
                      pad_token_id=tok.endoftext, system_prompt=None)
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
    from nanovlm.data import load_images
    from nanovlm.siglip import SiglipImages
    ids, _ = tok.encode_chat([{"role": "user", "content": "<image>\nWhat colour is the circle?"}], 4,
                             add_generation_prompt=True, system=None)
    tokens = greedy_by_full_forward(model, ids, load_images([image], SiglipImages(32, 4), "x")["pixel_values"], 6)
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


def eval_rows(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "qtype": "colour",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
            {"qtype": "text", "conversations": [{"from": "human", "value": "Say a"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    from nanovlm.data import load_data
    return load_data(str(tmp_path / "val.json"))


def test_pass_at_k_and_sampled_accuracy_by_hand(tmp_path):
    """Scripted sampled answers: question 1 ("red") draws red, blue, red, c -> pass 1, sampled 2/4; question 2
    ("a") draws b four times -> pass 0, sampled 0. Rows come as k consecutive answers per question."""
    from nanovlm.evaluate import evaluate_answers, format_report
    model, tok = make_ckpt(tmp_path / "ckpt")
    samples = eval_rows(tmp_path)
    scripted = ["red", "blue", "red", "c", "b", "b", "b", "b"]
    greedy_generate, seen = model.generate, {}

    def generate(prompts, pixel_values=None, **kw):
        if kw.get("temperature", 0) == 0:
            return greedy_generate(prompts, pixel_values, **kw)
        seen.update(prompts=prompts, pixels=pixel_values, temperature=kw["temperature"])
        return [tok.encode(a) for a in scripted]
    model.generate = generate
    report = evaluate_answers(model, tok, samples, max_new_tokens=4, num_samples=4, temperature=0.7)
    assert seen["temperature"] == 0.7 and len(seen["prompts"]) == 8
    assert seen["prompts"][:4] == [seen["prompts"][0]] * 4 and seen["prompts"][4:] == [seen["prompts"][4]] * 4
    assert seen["pixels"].shape == (4, 3, 32, 32)   # the one image, once per sample of question 1
    assert report["colour"]["pass@4"] == 1.0 and report["colour"]["sampled"] == 0.5
    assert report["text"]["pass@4"] == 0.0 and report["text"]["sampled"] == 0.0
    assert report["all"]["pass@4"] == 0.5 and report["all"]["sampled"] == 0.25
    assert "pass@4" in format_report(report).splitlines()[0]


def test_sampling_at_a_tiny_temperature_is_greedy(tmp_path):
    """At temperature 1e-4 the softmax is the argmax: every sampled answer is the greedy one, so pass@k and the
    sampled score equal the greedy exact score for each question type."""
    from nanovlm.evaluate import evaluate_answers
    model, tok = make_ckpt(tmp_path / "ckpt")
    samples = eval_rows(tmp_path)
    samples[1]["messages"][-1]["content"] = tok.decode(greedy_by_full_forward(      # make question 2 right
        model, tok.encode_chat(samples[1]["messages"][:-1], 4, add_generation_prompt=True, system=None)[0], None, 3),
        skip_special_tokens=True).strip()
    report = evaluate_answers(model, tok, samples, max_new_tokens=3, num_samples=3, temperature=1e-4,
                              generator=torch.Generator().manual_seed(0))
    assert report["text"]["exact"] == 1.0 and report["colour"]["exact"] == 0.0
    for key in ("colour", "text", "all"):
        assert report[key]["pass@3"] == report[key]["sampled"] == report[key]["exact"]


def test_eval_num_samples_needs_a_temperature(tmp_path):
    make_ckpt(tmp_path / "ckpt")
    eval_rows(tmp_path)
    with pytest.raises(SystemExit, match="--temperature > 0"):
        sample.main(["--ckpt", str(tmp_path / "ckpt"), "--eval", str(tmp_path / "val.json"), "--num-samples", "4",
                     "--device", "cpu"])


def test_eval_honours_max_new_tokens_and_writes_predictions(tmp_path):
    """--eval --max-new-tokens 3 --out FILE: one JSON line per sample whose prediction is the 3-token greedy answer
    (the tiny model never stops early: its stop tokens have logit 0), scored against the reference."""
    from nanovlm.data import load_images
    from nanovlm.siglip import SiglipImages
    model, tok = make_ckpt(tmp_path / "ckpt")
    samples = eval_rows(tmp_path)
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--eval", str(tmp_path / "val.json"), "--max-new-tokens", "3",
                 "--out", str(tmp_path / "preds.jsonl"), "--device", "cpu"])
    rows = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
    assert [r["where"] for r in rows] == [s["where"] for s in samples]
    for r, s in zip(rows, samples):
        ids, _ = tok.encode_chat(s["messages"][:-1], 4, add_generation_prompt=True, system=None)
        pixels = load_images(s["images"], SiglipImages(32, 4), "x")["pixel_values"] if s["images"] else None
        tokens = greedy_by_full_forward(model, ids, pixels, 3)
        assert len(tokens) == 3 and r["prediction"] == tok.decode(tokens, skip_special_tokens=True).strip()
        assert r["reference"] == s["messages"][-1]["content"] and r["exact"] == float(r["prediction"] == r["reference"])
        assert r["question"] == s["messages"][-2]["content"]


def test_answer_tags_score_the_text_inside_answer(tmp_path):
    """answer_tags=True (a prompt suffix that asks for <answer>...</answer>): the scored prediction is the text in
    the last answer tag; without the tags the whole answer is scored, as before."""
    from nanovlm.evaluate import evaluate_answers
    model, tok = make_ckpt(tmp_path / "ckpt")
    samples = eval_rows(tmp_path)
    model.generate = lambda prompts, pixel_values=None, **kw: [tok.encode(a) for a in
                                                               ["<think>red?</think><answer>red</answer>", "a"]]
    records = []
    report = evaluate_answers(model, tok, samples, answer_tags=True, records=records)
    assert [r["prediction"] for r in records] == ["red", "a"] and report["all"]["exact"] == 1.0
    report = evaluate_answers(model, tok, samples)
    assert report["colour"]["exact"] == 0.0 and report["text"]["exact"] == 1.0


def test_dtype_flag_loads_the_weights_in_that_dtype(tmp_path, monkeypatch):
    """--dtype bf16 generates with bf16 weights (CPU included); auto is fp32 on a CPU."""
    make_ckpt(tmp_path / "ckpt")
    loaded, from_pretrained = [], VLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = from_pretrained(cls, *args, **kwargs)
        loaded.append(model.lm.embed_tokens.weight.dtype)
        return model
    monkeypatch.setattr(VLM, "from_pretrained", classmethod(spy))
    for flag in (["--dtype", "bf16"], []):
        sample.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu",
                     *flag])
    assert loaded == [torch.bfloat16, torch.float32]
