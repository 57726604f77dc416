"""Bad input (issue 18): every kind a new user is likely to hit, each refused with one line naming the place
(file:line, sample, turn, tensor, reward function, flag), and none of the once-silent ones accepted any more.
This file is the data side: tiny files written into tmp_path, real images written by PIL/numpy, rewards, the
tokenizer file, the CLI wrapper. The run-time side (flags, --init-from, --resume, Ctrl-C, crashes, a non-finite
loss) is tests/test_bad_runs.py."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import chat, tiny_vlm, write
from nanovlm import rewards
from nanovlm import train_utils as tu
from nanovlm.cli import run_cli
from nanovlm.data import VLMDataset, fit_lengths, load_data, load_images, parse_data_spec
from nanovlm.qwen2 import Qwen2, Qwen2Config
from nanovlm.siglip import SiglipImages, preprocess_image
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree sits one level deeper); absent in a plain clone: the test skips
QWEN_TOKENIZER = next((d / "shared" / "qwen-tokenizer" / "tokenizer.json.gz" for d in (ROOT.parent, ROOT.parent.parent)
                       if (d / "shared" / "qwen-tokenizer" / "tokenizer.json.gz").exists()), Path("absent"))


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
