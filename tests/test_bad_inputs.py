"""Bad input (issue 18): every kind a new user is likely to hit, each refused with one line naming the place
(file:line, sample, turn, tensor, reward function, flag), and none of the once-silent ones accepted any more.
The data side: tiny files written into tmp_path, real images written by PIL/numpy. The run-time side: flag values,
--init-from and --resume against what the checkpoint holds, Ctrl-C, a crash inside a checkpoint save and a
non-finite loss, the last three end to end on the tiny preset, where a resumed run must equal an uninterrupted one."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from nanovlm import rewards
from nanovlm import train_utils as tu
from nanovlm import vlm_train as vt
from nanovlm.cli import run_cli
from nanovlm.data import VLMDataset, fit_lengths, load_data, load_images, parse_data_spec
from nanovlm.qwen2 import Qwen2, Qwen2Config
from nanovlm.siglip import SiglipImages, preprocess_image
from nanovlm.tokenizer import Tokenizer, train_tiny_tokenizer
from nanovlm.vlm import VLM

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree sits one level deeper); absent in a plain clone: the test skips
QWEN_TOKENIZER = next((d / "shared" / "qwen-tokenizer" / "tokenizer.json.gz" for d in (ROOT.parent, ROOT.parent.parent)
                       if (d / "shared" / "qwen-tokenizer" / "tokenizer.json.gz").exists()), Path("absent"))


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(["Describe the image. A red circle. What is written? hello there"] * 20, 300)


def write(path, text):
    Path(path).write_text(text, encoding="utf-8")
    return str(path)


def chat(*turns):
    """A role/content record: chat("user", "hi", "assistant", "hello")."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2])]})


# ---- data files -----------------------------------------------------------------------------------------------

# (file name, contents, the error it must give: file:line first, then what is wrong)
BAD_FILES = [
    # 1. no assistant turn: trains nothing (as validation data it reported val loss 0.0)
    ("noanswer.jsonl", chat("user", "hi") + "\n",
     r"noanswer\.jsonl:1: the conversation ends on a user turn \(turn 0\)"),
    # every record without one: the first named, the others counted with their lines
    ("allnoanswer.jsonl", "\n".join([chat("user", "a"), chat("user", "b"), chat("system", "s", "user", "c")]) + "\n",
     r"allnoanswer\.jsonl:1: the conversation ends on a user turn .*\(and 2 more bad record\(s\) in "
     r".*allnoanswer\.jsonl, line 2, 3\)"),
    ("onlysystem.jsonl", chat("system", "be brief") + "\n", r"onlysystem\.jsonl:1: the conversation has no user"),
    # 2. roles out of order
    ("assistantfirst.jsonl", chat("user", "q", "assistant", "a") + "\n" + chat("assistant", "a", "user", "q") + "\n",
     r"assistantfirst\.jsonl:2: turn 0 has role 'assistant' where 'user' belongs"),
    ("twousers.json", "[\n" + chat("user", "q", "user", "q2", "assistant", "a") + "\n]",
     r"twousers\.json:2: turn 1 has role 'user' where 'assistant' belongs"),
    ("endsonuser.jsonl", chat("user", "q", "assistant", "a", "user", "q2") + "\n",
     r"endsonuser\.jsonl:1: the conversation ends on a user turn \(turn 2\)"),
    ("midsystem.jsonl", chat("user", "q", "assistant", "a", "system", "s", "assistant", "b") + "\n",
     r"midsystem\.jsonl:1: turn 2 has role 'system' where 'user' belongs .*only the first turn may be the system"),
    ("llava_gpt_first.json", json.dumps([{"conversations": [{"from": "gpt", "value": "hi"},
                                                            {"from": "human", "value": "q"}]}]),
     r"llava_gpt_first\.json:1: turn 0 has role 'assistant' where 'user' belongs"),
    # 5. two JSON lists one after the other: only the first was read
    ("twolists.json", '[\n{"query": "q", "response": "r"}\n]\n[\n{"query": "q", "response": "r"}\n]\n',
     r"twolists\.json:4: text after the JSON list's closing '\]'"),
    # a pretty-printed object was reported as a malformed JSON line
    ("object.json", json.dumps({"data": [{"query": "q", "response": "r"}], "version": 1}, indent=2),
     r"object\.json:1: the file is a single JSON object \(keys \['data', 'version'\]\); expected a JSON list"),
    # an empty dataset (an IndexError deep in batch_indices before)
    ("empty.jsonl", "\n\n", r"empty\.jsonl: no records"),
    ("emptylist.json", "[ ]", r"emptylist\.json: no records"),
]


@pytest.mark.parametrize("name,text,match", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_data_file_names_file_and_line(tmp_path, name, text, match):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=match) as e:
        load_data(path)
    assert "\n" not in str(e.value)   # one line


def test_non_utf8_bytes_name_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "q", "response": "r"}\n{"query": "caf\xe9", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: byte 0xe9 \(column 15\) is not UTF-8"):
        load_data(str(path))
    bom = write(tmp_path / "bom.json", "\ufeff" + '[{"query": "q", "response": "r"}]')   # a UTF-8 BOM is fine
    assert len(load_data(bom)) == 1


@pytest.mark.parametrize("spec,match", [
    ("a.jsonl:abc", r"bad --data item 'a\.jsonl:abc': weight 'abc' is not a number"),
    ("a.jsonl b.jsonl:inf", r"bad --data item 'b\.jsonl:inf': .*finite number > 0"),
    ("a.jsonl:nan", r"bad --data item 'a\.jsonl:nan'"),
    ("a.jsonl:-1", r"bad --data item 'a\.jsonl:-1'"),
    ("", r"empty data spec"),
])
def test_bad_data_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_data_spec(spec)


def test_data_spec_paths_with_colons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "odd:name.jsonl", '{"query": "q", "response": "r"}\n')
    assert parse_data_spec("odd:name.jsonl C:/x/y.json:2") == [("odd:name.jsonl", 1.0), ("C:/x/y.json", 2.0)]


def test_mixing_weight_rounding_to_zero_is_an_error(tmp_path):
    big = write(tmp_path / "sft_train.jsonl", "".join('{"query": "q%d", "response": "r"}\n' % i for i in range(60)))
    ocr = write(tmp_path / "ocr_train.jsonl", '{"query": "q", "response": "r"}\n' * 5)
    # 65 samples in all; 65 * 0.005 / 1.005 rounds to 0
    with pytest.raises(ValueError, match=r"ocr_train\.jsonl: weight 0\.005 of 1\.005 in total gives it 0 of the 65"):
        load_data(f"{big} {ocr}:0.005")
    assert sum(s["where"].startswith(ocr) for s in load_data(f"{big} {ocr}:0.01")) == 1   # rounds to 1: fine


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"))


# ---- the dataset: lengths, control tokens, numbers, summary ---------------------------------------------------

def test_drop_long_dropping_everything_names_the_files(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", '{"query": "Describe the image.", "response": "A red circle."}\n' * 2)
    b = write(tmp_path / "b.jsonl", '{"query": "What is written?", "response": "hello there"}\n')
    samples = load_data(f"{a} {b}")
    with pytest.raises(ValueError, match=rf"no samples left in ({a}, {b}|{b}, {a}): all {len(samples)} are longer "
                                         r"than max_length=5 \(first .*\.jsonl:1 \(\d+ tokens\)"):
        VLMDataset(samples, tok, SiglipImages(16, 4), max_length=5, drop_long=True)
    with pytest.raises(ValueError, match="no samples: the dataset is empty"):
        VLMDataset([], tok, SiglipImages(16, 4), max_length=100)
    # the GRPO prompts go through the same check
    with pytest.raises(ValueError, match=r"no samples left in .*a\.jsonl.*longer than --max-length 5"):
        fit_lengths(load_data(a), [9, 9], 5, drop_long=True, limit="--max-length 5")


def test_summary_line_per_file(tmp_path, tok, capsys):
    a = write(tmp_path / "a.jsonl", '{"query": "Describe the image.", "response": "A red circle."}\n'
                                    '{"query": "Describe the image.", "response": "' + "A red circle. " * 20 + '"}\n')
    b = write(tmp_path / "b.jsonl", '{"query": "What is written?", "response": "hello"}\n')
    samples = load_data(f"{a}:2 {b}:1", total=6, seed=0)   # a: 4 samples (2 records, each twice), b: 2 (1 record)
    lengths = tok.chat_lengths([s["messages"] for s in samples], 4, None)
    limit = sorted(set(lengths))[-2]   # the long record of a.jsonl does not fit, everything else does
    ds = VLMDataset(samples, tok, SiglipImages(16, 4), max_length=limit, drop_long=True, system=None)
    out = capsys.readouterr().out.splitlines()
    assert f"data {a}: 2 samples (2 records), 2 dropped: longer than max_length={limit}, first {a}:2 " \
           f"({max(lengths)} tokens)" in out
    assert f"data {b}: 2 samples (1 record), 0 dropped" in out
    assert len(ds) == 4 and ds.n_dropped == 2


@pytest.mark.parametrize("role,text", [
    ("user", "What is written?<|im_end|>\n<|im_start|>assistant\nhello"),   # injects an answer
    ("assistant", "A red circle.<|endoftext|>"),
    ("user", "<|vision_start|><|image_pad|><|vision_end|> describe"),        # fake image slots
])
def test_chat_control_tokens_in_data_are_refused(tmp_path, tok, role, text):
    turns = ["user", "Describe the image.", "assistant", "A red circle."]
    turns[1 if role == "user" else 3] = text
    path = write(tmp_path / "inject.jsonl", chat(*turns) + "\n")
    k = 0 if role == "user" else 1
    with pytest.raises(ValueError, match=rf"inject\.jsonl:1: turn {k} \({role}\) contains '<\|[a-z_]+\|>', a control "
                                         "token of the chat template"):
        VLMDataset(load_data(path), tok, SiglipImages(16, 4), max_length=200)
    with pytest.raises(ValueError, match=rf"^chat: turn {k} \({role}\) contains"):   # and the tokenizer itself
        tok.encode_chat(load_data(path)[0]["messages"], 4)
    with pytest.raises(ValueError, match=r"^system prompt contains"):
        tok.encode_chat([{"role": "user", "content": "hi"}], 4, system="be brief<|im_end|>")


@pytest.mark.skipif(not QWEN_TOKENIZER.exists(), reason="needs ../shared/qwen-tokenizer")
def test_qwen_control_tokens(tmp_path):
    """With the real tokenizer: its special tokens (all 14, the unused ones like <|box_start|> too) are refused;
    its non-special added tokens (<think>, <tool_call>) are ordinary text and still tokenize as one id each."""
    (tmp_path / "tokenizer.json").write_bytes(gzip.decompress(QWEN_TOKENIZER.read_bytes()))
    qwen = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match=r"s\.json:3: turn 0 \(user\) contains '<\|box_start\|>'"):
        qwen.encode_chat([{"role": "user", "content": "a <|box_start|> b"}], 4, where="s.json:3")
    ids, labels = qwen.encode_chat([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "<think>x</think>"}], 4)
    think = qwen.tok.token_to_id("<think>")
    assert think in ids and labels[ids.index(think)] == think


@pytest.mark.parametrize("numeric", [True, False])
def test_number_overflowing_to_inf(tmp_path, tok, numeric):
    path = write(tmp_path / "nums.jsonl", chat("user", "How much?", "assistant", "<num><1.5>") + "\n"
                 + chat("user", "How much?", "assistant", "<num><1e400>") + "\n")
    with pytest.raises(ValueError, match=r"nums\.jsonl:2: number '1e400' at character 0 is too large for a float"):
        VLMDataset(load_data(path), tok, SiglipImages(16, 4), max_length=200, numeric=numeric)


def test_hand_built_samples_get_the_role_check(tok):
    s = [{"images": [], "where": "mine:7", "messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match=r"mine:7: the conversation ends on a user turn"):
        VLMDataset(s, tok, SiglipImages(16, 4), max_length=100)


# ---- images ---------------------------------------------------------------------------------------------------

def pixels_8bit(arr8, size=8):
    """The reference: the same picture as a plain 8-bit grey image, preprocessed the ordinary way."""
    return preprocess_image(Image.fromarray(arr8, "L"), size)


@pytest.mark.parametrize("kind", ["png16", "tiff_float", "tiff_int32"])
def test_high_bit_depth_images_scale_like_their_8bit_version(tmp_path, kind):
    """A 16-bit PNG loaded all white, a 0..1 float TIFF all black. Each file holds an 8-bit picture written at
    a higher depth (v * 257 in 16 bits is exactly v in 8; v / 255 as a float), so it must preprocess exactly
    as that 8-bit picture does."""
    arr8 = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    high, name = {"png16": (arr8.astype(np.uint16) * 257, "g16.png"),
                  "tiff_float": ((arr8 / 255).astype(np.float32), "f.tif"),
                  "tiff_int32": (arr8.astype(np.int32) * 257, "i.tif")}[kind]
    Image.fromarray(high).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == {"png16": "I;16", "tiff_float": "F", "tiff_int32": "I"}[kind]
    got = load_images([str(tmp_path / name)], SiglipImages(8, 1), "d.jsonl:1")["pixel_values"][0]
    torch.testing.assert_close(got, pixels_8bit(arr8), atol=0, rtol=0)
    assert 0.2 < float((got + 1).mean() / 2) < 0.8   # neither all white nor all black


@pytest.mark.parametrize("array,match", [
    (np.full((8, 8), 200.0, np.float32), r"float pixels in \[200, 200\]: expected 0\.\.1"),
    (np.full((8, 8), np.nan, np.float32), r"float pixels in \[nan, nan\]: expected 0\.\.1"),
    (np.full((8, 8), 70000, np.int32), r"I pixels in \[70000, 70000\]: expected 16-bit values"),
])
def test_high_bit_depth_images_out_of_range_are_refused(tmp_path, array, match):
    Image.fromarray(array).save(tmp_path / "odd.tif")
    with pytest.raises(ValueError, match=rf"d\.jsonl:4: cannot read image .*odd\.tif: {match}"):
        load_images([str(tmp_path / "odd.tif")], SiglipImages(8, 1), "d.jsonl:4")


def test_unsupported_image_mode_refused_at_load(tmp_path):
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    path = write(tmp_path / "d.jsonl", '{"query": "q", "response": "r", "image_path": "lab.tif"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: image .*lab\.tif has pixel mode 'LAB', which is not supported"):
        load_data(path)


# ---- checkpoints ----------------------------------------------------------------------------------------------

def poison(file, key):
    tensors = load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    tensors[key].view(-1)[5] = float("inf")
    save_file(tensors, file)


def tiny_vlm():
    cfg = tiny_config(lm=dict(vocab_size=64, num_hidden_layers=1),
                      vision=dict(image_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2),
                      projector=dict(shuffle_factor=1), image_token_id=63, stop_token_ids=(62,), pad_token_id=61)
    return VLM(cfg)


@pytest.mark.parametrize("loader", ["Qwen2.from_pretrained", "VLM.from_pretrained", "train_utils.load_checkpoint"])
def test_nan_in_checkpoint_names_the_tensor(tmp_path, loader):
    if loader == "Qwen2.from_pretrained":
        Qwen2(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
        key, load = "model.layers.0.mlp.up_proj.weight", lambda: Qwen2.from_pretrained(tmp_path)
    elif loader == "VLM.from_pretrained":
        tiny_vlm().save_pretrained(tmp_path)
        key, load = "projector.fc1.weight", lambda: VLM.from_pretrained(tmp_path)
    else:
        model = tiny_vlm()
        tu.save_checkpoint(tmp_path / "ck", model, model.cfg.to_dict())
        tmp_path = tmp_path / "ck"
        key, load = "lm.layers.0.attn.q_proj.weight", lambda: tu.load_checkpoint(tmp_path, tiny_vlm())
    assert key in load_file(tmp_path / "model.safetensors")
    poison(tmp_path / "model.safetensors", key)
    with pytest.raises(ValueError, match=rf"1 tensor\(s\) hold NaN/inf values: {key} \(2 of \d+\)"):
        load()


# ---- rewards --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["float('nan')", "float('inf')", "None", "'high'"])
def test_reward_returning_a_non_number_names_function_and_sample(tmp_path, bad):
    plugin = write(tmp_path / "my_rewards.py", f"""
def reward_flaky(completions, solutions, **columns):
    return [1.0 if i != 2 else {bad} for i in range(len(completions))]
""")
    registry = dict(rewards.REWARD_FUNCS)
    rewards.load_reward_plugin(plugin, registry)
    where = ["ocr.jsonl:1", "ocr.jsonl:1", "ocr.jsonl:9", "ocr.jsonl:9"]   # two completions per prompt
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rewards, "REWARD_FUNCS", registry)
        with pytest.raises(ValueError, match=r"reward 'reward_flaky' returned .* for completion 2 \(sample "
                                             r"ocr\.jsonl:9\): a reward must be a finite number"):
            rewards.combine_rewards(["ocr", "reward_flaky"], None, ["a"] * 4, ["a"] * 4, where=where)


def test_reward_returning_none_for_the_batch():
    registry = {"lazy": lambda completions, solutions, **c: None}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rewards, "REWARD_FUNCS", registry)
        with pytest.raises(ValueError, match=r"reward 'lazy' returned None for 2 completions"):
            rewards.combine_rewards(["lazy"], None, ["a", "b"], ["a", "b"])


# ---- tokenizer file, the CLI wrapper --------------------------------------------------------------------------

def test_tokenizer_file_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"tokenizer file not found: {tmp_path}/tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    write(tmp_path / "tokenizer.json", "{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer\.json: not a readable tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("error,shown", [
    (ValueError("a.jsonl:3: the conversation ends on a user turn"), "a.jsonl:3: the conversation ends on a user turn"),
    (FileNotFoundError("data file not found: x.json"), "data file not found: x.json"),
    (KeyError("unknown reward 'ocrr'"), "unknown reward 'ocrr'"),   # not its repr, with quotes around
])
def test_run_cli_one_line_and_exit_code_2(monkeypatch, capsys, error, shown):
    def main():
        raise error
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {shown}\n"
    monkeypatch.setenv("NANOVLM_DEBUG", "1")   # the traceback, for a bug report
    with pytest.raises(type(error)):
        run_cli(main)


def test_run_cli_passes_other_errors_and_exit_codes(monkeypatch):
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)
    with pytest.raises(RuntimeError):   # a bug or CUDA out of memory keeps its traceback
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: None)
    assert e.value.code is None


def test_scripts_print_one_line_errors(tmp_path):
    """Each script, run as a user runs it, ends in run_cli: a bad path is one stderr line and exit code 2."""
    missing = str(tmp_path / "missing")
    commands = {
        "sample.py": ["--ckpt", missing, "--prompt", "hi"],
        "train_sft.py": ["--preset", "qwen2.5-0.5b-siglip", "--lm", missing, "--data", "x.json"],
        "train_pretrain.py": ["--preset", "qwen2.5-0.5b-siglip", "--lm", missing, "--data", "x.json"],
        "train_grpo.py": ["--init-from", missing],
        "train_gpt.py": ["--init-from", missing],
        "sample_gpt.py": ["--ckpt", missing, "--tokens", "<IMG>"],
    }
    env = {**os.environ, "NANOVLM_DEBUG": "", "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0], (name, err)
        assert "Traceback" not in err


def test_every_accepted_sample_trains_something(tmp_path, tok):
    """Why the role check closes the val-loss-0.0 hole: a conversation ending on an assistant turn trains at least
    that turn's <|im_end|>, even when the answer is empty."""
    path = write(tmp_path / "ok.jsonl", chat("user", "Describe the image.", "assistant", "") + "\n")
    item = VLMDataset(load_data(path), tok, SiglipImages(16, 4), max_length=100)[0]
    assert [t for t in item["labels"].tolist() if t != -100] == [tok.im_end]


# ---- flags ----------------------------------------------------------------------------------------------------

def sft_args(*argv, stage="sft"):
    return vt.resolve_args(vt.build_parser("", stage).parse_args(["--data-dir", "unused", *argv]))


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], r"^--batch-size 0: must be at least 1$"),      # was "max() arg is an empty sequence"
    (["--grad-accum", "0"], r"^--grad-accum 0: must be at least 1$"),
    (["--max-steps", "0"], r"^--max-steps 0: must be at least 1$"),        # was: exit 0, no checkpoint, no word
    (["--max-steps", "-5"], r"^--max-steps -5: must be at least 1$"),
    (["--log-every", "0"], r"^--log-every 0: must be at least 1$"),        # was a ZeroDivisionError
    (["--save-every", "0"], r"^--save-every 0: must be at least 1$"),
    (["--lr-lm", "-0.0001"], r"^--lr-lm -0\.0001: must be a finite number >= 0$"),
    (["--lr-vision", "nan"], r"^--lr-vision nan: must be a finite number >= 0$"),
    (["--warmup-steps", "-1"], r"^--warmup-steps -1: must be a finite number >= 0$"),
    (["--min-lr-ratio", "2"], r"^--min-lr-ratio 2\.0: must be between 0 and 1$"),
    (["--grad-clip", "0"], r"^--grad-clip 0\.0: must be > 0"),
    (["--num-workers", "-2"], r"^--num-workers -2: must be >= 0"),
])
def test_bad_flag_values_are_one_line(argv, match):
    with pytest.raises(ValueError, match=match):
        sft_args(*argv)


def test_out_dir_naming_a_file(tmp_path):
    write(tmp_path / "taken", "")
    with pytest.raises(ValueError, match=rf"^--out-dir {tmp_path}/taken: {tmp_path}/taken is a file, not a directory$"):
        sft_args("--out-dir", str(tmp_path / "taken"))
    with pytest.raises(ValueError, match=rf"^--out-dir {tmp_path}/taken/sub: {tmp_path}/taken is a file"):
        sft_args("--out-dir", str(tmp_path / "taken" / "sub"))   # was FileExistsError / NotADirectoryError


@pytest.mark.parametrize("argv,match", [
    (["--temperature", "0"], r"^--temperature 0\.0: must be > 0"),
    (["--top-p", "0"], r"^--top-p 0\.0: must be in \(0, 1\]$"),
    (["--max-new-tokens", "0"], r"^--max-new-tokens 0: must be at least 1$"),
    (["--num-iterations", "0"], r"^--num-iterations 0: must be at least 1$"),
    (["--beta", "-0.1"], r"^--beta -0\.1: must be a finite number >= 0$"),
    (["--reward-funcs", "ocr", "--reward-weights", "inf"], r"^--reward-weights inf: must be a finite number$"),
])
def test_bad_grpo_flag_values(tmp_path, argv, match):
    from train_grpo import parse_args
    tiny_vlm().save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match=match):
        parse_args(["--init-from", str(tmp_path / "sft"), "--data-dir", str(tmp_path), *argv])


def test_scripts_refuse_bad_flags_in_one_line(tmp_path):
    """As a user runs them: exit code 2, one line on stderr, nothing trained or written."""
    commands = {"train_sft.py": (["--batch-size", "0"], "error: --batch-size 0: must be at least 1"),
                "train_pretrain.py": (["--max-steps", "0"], "error: --max-steps 0: must be at least 1")}
    env = {**os.environ, "NANOVLM_DEBUG": "", "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / name), "--data-dir", str(tmp_path / "d"),
                                     "--out-dir", str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in commands.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.strip() == commands[name][1], (name, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()


# ---- --init-from: the checkpoint decides the model ------------------------------------------------------------

@pytest.mark.parametrize("argv,clash", [
    (["--image-size", "64"], "--image-size 64 (it has 16)"),          # was: silently trained at 16
    (["--patch-size", "4"], "--patch-size 4 (it has 8)"),
    (["--slot-embedding"], "--slot-embedding True (it has False)"),
    (["--image-size", "32", "--patch-size", "16"], "--image-size 32 (it has 16), --patch-size 16 (it has 8)"),
])
def test_init_from_refuses_flags_the_checkpoint_decides(tmp_path, argv, clash):
    tiny_vlm().save_pretrained(tmp_path / "ck")   # 16 x 16 images, 8 x 8 patches, no slot embedding
    with pytest.raises(ValueError, match=re.escape(f"--init-from {tmp_path / 'ck'} decides the model, but {clash}: "
                                                   "drop the flag(s)")):
        sft_args("--init-from", str(tmp_path / "ck"), *argv)


def test_init_from_accepts_what_the_checkpoint_has(tmp_path, capsys):
    tiny_vlm().save_pretrained(tmp_path / "ck")
    sft_args("--init-from", str(tmp_path / "ck"), "--image-size", "16", "--patch-size", "8")   # the same: fine
    args = sft_args("--init-from", str(tmp_path / "ck"))   # the preset's 96 is no request: the checkpoint's 16 holds
    assert args.image_size == 96 and "warning" not in capsys.readouterr().err
    sft_args("--init-from", str(tmp_path / "ck"), "--lm", "Qwen/Qwen2.5-0.5B-Instruct")
    assert capsys.readouterr().err == f"warning: --init-from {tmp_path / 'ck'} holds the model: --lm ignored\n"


def test_init_from_numeric_head_decides_its_shape(tmp_path):
    from nanovlm.numeric import NumericConfig, NumericVLM
    NumericVLM.from_vlm(tiny_vlm(), NumericConfig(60, hidden=24)).save_pretrained(tmp_path / "num")
    with pytest.raises(ValueError, match=r"--numeric-hidden 512 \(it has 24\), --numeric-transform 'identity' "
                                         r"\(it has 'symlog'\)"):
        sft_args("--init-from", str(tmp_path / "num"), "--numeric-hidden", "512", "--numeric-transform", "identity")
    tiny_vlm().save_pretrained(tmp_path / "plain")   # no head: the flags shape the new one
    assert sft_args("--init-from", str(tmp_path / "plain"), "--numeric", "--numeric-hidden", "8").numeric_hidden == 8


# ---- --resume: the run's own flags ----------------------------------------------------------------------------

def saved_run(tmp_path, tok, *argv, step=2):
    """A checkpoint at `step` in tmp_path/run written as the training scripts write it, by a run with these flags."""
    args = sft_args("--out-dir", str(tmp_path / "run"), "--max-steps", "4", *argv)
    model = tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    vt.save_vlm_checkpoint(tmp_path / "run", model, tok, opt, step, args, tu.Dist())
    return model, opt


def test_resume_refuses_flags_that_change_the_run(tmp_path, tok):
    saved_run(tmp_path, tok)
    out = ["--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--resume"]
    with pytest.raises(ValueError, match=r"^--resume: --batch-size 32 -> 4, --optimizer 'muon' -> 'adamw' differ from "
                                         rf"the run in {tmp_path}/run \(args\.json\); only --max-steps, --log-every, "
                                         r".*may change on resume"):
        vt.check_resume(sft_args(*out, "--batch-size", "4", "--optimizer", "adamw"), tu.Dist())
    for argv in (["--lora-rank", "4"], ["--numeric"], ["--seed", "1"], ["--dtype", "bf16"]):
        with pytest.raises(ValueError, match=rf"^--resume: {argv[0]} "):
            vt.check_resume(sft_args(*out, *argv), tu.Dist())
    with pytest.raises(ValueError, match=r"^--resume: the number of processes 1 -> 2 differ"):   # the global batch
        vt.check_resume(sft_args(*out), tu.Dist(world_size=2))
    with pytest.raises(ValueError, match=r"^--resume: the stage 'sft' -> 'pretrain' differ|^--resume: .*--stage"):
        vt.check_resume(sft_args(*out, stage="pretrain"), tu.Dist())


def test_grpo_resume_refuses_flags_that_change_the_run(tmp_path, tok):
    from train_grpo import parse_args
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "sft")
    common = ["--init-from", str(tmp_path / "sft"), "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "grpo")]
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    vt.save_vlm_checkpoint(tmp_path / "grpo", model, tok, opt, 5, parse_args(common), tu.Dist())
    with pytest.raises(ValueError, match=r"^--resume: --num-generations 8 -> 4, --beta 0\.0 -> 0\.04 differ"):
        vt.check_resume(parse_args(common + ["--num-generations", "4", "--beta", "0.04", "--resume"]), tu.Dist())
    vt.check_resume(parse_args(common + ["--eval-answers", "20", "--resume"]), tu.Dist())


def test_resume_may_change_when_to_stop_and_keeps_the_runs_args_json(tmp_path, tok, capsys):
    model, opt = saved_run(tmp_path, tok)
    first = (tmp_path / "run" / "args.json").read_text()
    args = sft_args("--out-dir", f"{tmp_path}/./run", "--max-steps", "8", "--log-every", "1", "--resume")
    vt.check_resume(args, tu.Dist())
    assert capsys.readouterr().out == ("--resume from step 2: --max-steps 4 -> 8, --log-every 10 -> 1 (the "
                                       "learning-rate schedule now ends at the new --max-steps)\n")
    assert json.loads((tmp_path / "run" / "resumes.jsonl").read_text()) == {
        "step": 2, "changed": {"max_steps": [4, 8], "log_every": [10, 1]}}
    vt.save_vlm_checkpoint(tmp_path / "run", model, tok, opt, 3, args, tu.Dist())   # the resumed run saves
    assert (tmp_path / "run" / "args.json").read_text() == first   # still the flags that started the run
    assert (tmp_path / "run" / "resumes.jsonl").exists()           # carried across the checkpoint swap


def test_resume_forgets_the_rows_a_lost_run_logged_after_the_checkpoint(tmp_path, tok):
    """A run killed between saves had logged rows for steps the resumed run does again (and maybe half a row);
    they would appear twice. The checkpoint records how many rows it had."""
    (tmp_path / "run").mkdir()
    rows = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.5}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved_run(tmp_path, tok)   # at step 2, with those two rows
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 2.4}) + '\n{"step": 3, "lo')   # the lost run's, the last cut short
    vt.check_resume(sft_args("--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--resume"), tu.Dist())
    assert [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == rows


def test_resume_at_or_past_max_steps(tmp_path, tok, capsys):
    saved_run(tmp_path, tok, step=4)
    out = ["--out-dir", str(tmp_path / "run"), "--resume"]
    with pytest.raises(ValueError, match=rf"^--resume: the checkpoint in {tmp_path}/run is at step 4, past "
                                         r"--max-steps 3$"):
        vt.check_resume(sft_args(*out, "--max-steps", "3"), tu.Dist())
    vt.check_resume(sft_args(*out, "--max-steps", "4"), tu.Dist())
    assert f"the checkpoint in {tmp_path}/run is already at --max-steps 4: nothing to train" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint at {tmp_path}/none"):
        vt.check_resume(sft_args("--out-dir", str(tmp_path / "none"), "--resume"), tu.Dist())


@pytest.mark.parametrize("change", ["fewer parameters", "more groups"])
def test_optimizer_state_that_does_not_fit_names_the_checkpoint(tmp_path, change):
    """--resume after changing --optimizer, --lora-rank or --numeric was PyTorch's parameter-group error."""
    model = tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    tu.save_checkpoint(tmp_path / "ck", model, model.cfg.to_dict(), optimizer=opt, step=1)
    model2 = tiny_vlm()
    groups = ([("lm", model2.lm.parameters(), 1e-3)] if change == "fewer parameters" else
              [("lm", model2.lm.parameters(), 1e-3), ("rest", [*model2.vision.parameters(),
                                                               *model2.projector.parameters()], 1e-3)])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ck/train_state\.pt: its optimizer state does not fit this "
                                         rf"run's optimizer \(.*\): resume with the flags that started the run "
                                         rf"\({tmp_path}/ck/args\.json\)$"):
        tu.load_checkpoint(tmp_path / "ck", model2, tu.make_optimizer(groups))


# ---- Ctrl-C, a crash inside a save, a non-finite loss: the pieces ---------------------------------------------

def test_first_ctrl_c_is_a_flag_the_second_aborts(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    stop = tu.StopOnCtrlC(tu.Dist(), tmp_path)
    try:
        assert not stop.requested()
        signal.raise_signal(signal.SIGINT)   # handled between bytecodes: no KeyboardInterrupt
        assert stop.requested()
        assert "Ctrl-C: stopping at the end of this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt, match="aborted by a second Ctrl-C; no checkpoint was saved"):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_run_cli_prints_ctrl_c_as_one_line(monkeypatch, capsys):
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    def main():
        raise tu.Interrupted(7, "out/sft")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 130
    assert capsys.readouterr().err == ("\ninterrupted: stopped after step 7, checkpoint saved in out/sft: add --resume "
                                       "to continue\n")


def test_crash_between_the_renames_of_a_save_loses_nothing(tmp_path, monkeypatch):
    """The crash leaves no run directory, the old checkpoint as .run.old and the new, complete one as .run.tmp;
    metrics.jsonl lived in the run directory, so a resume that read .run.old lost the history (nothing to append
    to). Recovery renames the new one back into place, metrics.jsonl with it."""
    path, model = tmp_path / "run", tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    log = tu.MetricsLogger(path)
    for step in range(4):
        log.log(step, loss=4.0 - step)
        if step == 1:
            tu.save_checkpoint(path, model, model.cfg.to_dict(), optimizer=opt, step=2)
    real_rename = os.rename
    def rename(src, dst):
        if str(src).endswith(".run.tmp"):
            raise SystemExit("the process dies here")
        real_rename(src, dst)
    monkeypatch.setattr(tu.os, "rename", rename)
    with pytest.raises(SystemExit):
        tu.save_checkpoint(path, model, model.cfg.to_dict(), optimizer=opt, step=4)
    monkeypatch.undo()
    assert not path.exists() and (tmp_path / ".run.old").is_dir() and (tmp_path / ".run.tmp").is_dir()

    assert tu.checkpoint_dir(path) == tmp_path / ".run.tmp"   # what a read (--init-from, sample.py) takes
    tu.recover_checkpoint(path)                                # what --resume does first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.old", "run"]
    assert tu.load_checkpoint(path, tiny_vlm(), tu.make_optimizer([("all", tiny_vlm().parameters(), 1e-3)]))[
        "step"] == 4
    tu.MetricsLogger(path, resume_step=4)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_non_finite_loss_names_the_samples_of_its_step():
    losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    samples = [["a.jsonl:1", "a.jsonl:2"], ["b.jsonl:7", "a.jsonl:3"], ["a.jsonl:9"]]
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 11 \(samples: b\.jsonl:7, a\.jsonl:3\): "
                                                 r"check those samples"):
        tu.check_losses(losses, 12, tu.Dist(), samples)   # steps 10, 11, 12: the first non-finite one is named
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 11: check those samples"):
        tu.check_losses(losses, 12, tu.Dist())
    assert tu.check_losses(losses[:1], 3, tu.Dist(), samples[:1]) == 2.0


# ---- end to end: a tiny run interrupted, crashed, poisoned ----------------------------------------------------

STEPS = 12


def launch(args, patch=None):
    """Start a script as a user would (python train_sft.py ...), optionally with `patch` (Python source) run first
    in the same process, to make it crash where a test wants."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOVLM_DEBUG": ""}
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:]]
    if patch:
        cmd = [sys.executable, "-c", patch + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / args[0]), *args[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, code=0):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, f"exit {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The flags of a tiny SFT run (a loss row every step) and the weights of that run left uninterrupted."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["train_sft.py", "--data-dir", str(root / "data"), "--n-synthetic", "40", "--batch-size", "2",
             "--eval-every", "1000", "--save-every", "1000", "--warmup-steps", "1", "--device", "cpu",
             "--eval-answers", "0", "--log-every", "1", "--max-steps", str(STEPS)]
    finish(launch(flags + ["--out-dir", str(root / "straight")]))
    return flags, load_file(root / "straight" / "model.safetensors")


def loss_steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_ctrl_c_saves_at_the_end_of_the_step_and_resume_is_exact(tmp_path, tiny_run):
    flags, straight = tiny_run
    run = tmp_path / "run"
    proc = launch(flags + ["--out-dir", str(run)])
    deadline = time.time() + 300
    # two steps logged (whole lines, one per step): the loop is running
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)   # what Ctrl-C in the terminal sends
    out, err = finish(proc, 130)
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    step = int(re.fullmatch(rf"interrupted: stopped after step (\d+), checkpoint saved in {run}: add --resume to "
                            "continue", lines[0])[1])
    assert 2 <= step < STEPS
    assert torch.load(run / "train_state.pt", weights_only=False)["step"] == step
    assert loss_steps(run) == list(range(step))   # every step before the interrupt logged

    finish(launch(flags + ["--out-dir", str(run), "--resume"]))
    resumed = load_file(run / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)   # bit for bit
    assert loss_steps(run) == list(range(STEPS))


KILLED_AFTER_ROW_6 = """
import os
from nanovlm import train_utils as tu
log = tu.MetricsLogger.log
def log_then_die(self, step, **metrics):   # die (as kill -9 would) between two saves, rows logged after the first
    log(self, step, **metrics)
    if step == 6:
        os._exit(9)
tu.MetricsLogger.log = log_then_die
"""
CRASH_BETWEEN_RENAMES = """
import os
from pathlib import Path
real_rename = os.rename
def rename(src, dst):   # die between a save's two renames, once there is a checkpoint to swap
    if str(src).endswith('.tmp') and (Path(dst).parent / f'.{Path(dst).name}.old').exists():
        os._exit(9)
    real_rename(src, dst)
os.rename = rename
"""


@pytest.mark.slow
def test_crashes_lose_nothing_but_the_steps_since_the_last_save(tmp_path, tiny_run):
    """Killed between two saves, then inside a save (between its two renames): each --resume goes on from the
    last checkpoint saved, and the run ends with the weights and the metrics.jsonl of an uninterrupted run."""
    flags, straight = tiny_run
    run, every4 = tmp_path / "run", ["--out-dir", str(tmp_path / "run"), "--save-every", "4"]
    finish(launch(flags + every4, patch=KILLED_AFTER_ROW_6), 9)   # checkpoint at step 4, rows of steps 0..6
    assert torch.load(run / "train_state.pt", weights_only=False)["step"] == 4 and loss_steps(run)[-1] == 6

    finish(launch(flags + every4 + ["--resume"], patch=CRASH_BETWEEN_RENAMES), 9)   # inside step 8's save
    assert not run.exists() and (tmp_path / ".run.old").is_dir() and (tmp_path / ".run.tmp").is_dir()

    out, err = finish(launch(flags + every4 + ["--resume"]))
    assert f"{run}: recovered the checkpoint an interrupted save left in .run.tmp" in out
    resumed = load_file(run / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert loss_steps(run) == list(range(STEPS))   # each step's row once: none lost, none twice


NAN_AT_STEP_2 = """
import nanovlm.vlm as v
forward, calls = v.VLM.forward, []
def poisoned(self, *a, **k):   # the third training forward (step 2, one micro-batch per step) returns a NaN loss
    out = forward(self, *a, **k)
    if self.training:
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
    return out
v.VLM.forward = poisoned
"""


@pytest.mark.slow
def test_nan_loss_in_training_names_the_samples(tmp_path, tiny_run):
    flags, _ = tiny_run
    args = flags + ["--out-dir", str(tmp_path / "run")]
    out, err = finish(launch(args, patch=NAN_AT_STEP_2), 2)
    # the samples step 2 reads, from the data order's definition (train_utils.batch_indices) and the data files
    a = sft_args(*[x for x in args[1:] if x != "--eval-answers" and x != "0"])
    samples = load_data(a.data, a.image_root, seed=a.seed)
    want = {samples[i]["where"] for i in tu.batch_indices(2, 0, 0, 1, 2, 1, len(samples), a.seed)}
    m = re.fullmatch(r"error: loss is nan at step 2 \(samples: (.*)\): check those samples, lower --lr, or try "
                     r"--dtype fp32", err.strip().splitlines()[-1])
    assert m and set(m[1].split(", ")) == want, err
