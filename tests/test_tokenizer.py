"""Tokenizer: chat template vs transformers' apply_chat_template, hand-built label masks, image expansion."""
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanovlm.tokenizer import Tokenizer, train_tiny_tokenizer

# The public Qwen2.5-Instruct chat template (tool-calling branches left out: we only use text turns).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = ["A red circle in the top left and two blue squares in the bottom right.",
          "What colour is the shape in the center? green", "How many shapes are there? 3",
          "The price is ¥12.50, or $3.07. Ünïcödé 世界 text\n\n  with   spaces.", "KQX 4821"] * 30

CHATS = [
    [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "3"},
     {"role": "user", "content": "Where is the blue square?\n"},
     {"role": "assistant", "content": " bottom right\n\n"}],
    [{"role": "user", "content": "\n\nUnicode: ¥12.50 世界 Ünï"},
     {"role": "assistant", "content": "$3.07 世界"}],
    [{"role": "user", "content": "Only a question."}],
]


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_matches_transformers_apply_chat_template(tok, chat, gen):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = QWEN25_TEMPLATE
    text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    ref = hf(text, add_special_tokens=False)["input_ids"]
    assert tok.render_chat(chat, image_tokens=4, add_generation_prompt=gen)[0] == text
    ids, labels = tok.encode_chat(chat, image_tokens=4, add_generation_prompt=gen)
    assert ids == ref
    assert len(labels) == len(ids)


def test_label_mask_by_hand(tok):
    raw = tok.tok
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    S, E, NL = tok.im_start, tok.im_end, enc("\n")
    chat = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "3"},
            {"role": "user", "content": "And circles?"}, {"role": "assistant", "content": "two circles"}]
    # pieces written out by hand: (ids, trained?)
    pieces = [([S], 0), (enc("system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."), 0),
              ([E], 0), (NL, 0),
              ([S], 0), (enc("user\nHow many shapes are there?"), 0), ([E], 0), (NL, 0),
              ([S], 0), (enc("assistant\n"), 0), (enc("3"), 1), ([E], 1), (NL, 0),
              ([S], 0), (enc("user\nAnd circles?"), 0), ([E], 0), (NL, 0),
              ([S], 0), (enc("assistant\n"), 0), (enc("two circles"), 1), ([E], 1), (NL, 0)]
    want_ids = [i for p, _ in pieces for i in p]
    want_labels = [i if t else -100 for p, t in pieces for i in p]
    ids, labels = tok.encode_chat(chat, image_tokens=4)
    assert ids == want_ids and labels == want_labels
    # no system turn; generation prompt appended and untrained
    ids, labels = tok.encode_chat(chat[:1], image_tokens=4, add_generation_prompt=True, system=None)
    assert ids == [S] + enc("user\nHow many shapes are there?") + [E] + NL + [S] + enc("assistant\n")
    assert labels == [-100] * len(ids)


def test_image_expansion(tok):
    chat = [{"role": "user", "content": "<image>\nWhat is in <image>?"}, {"role": "assistant", "content": "x"}]
    ids, labels = tok.encode_chat(chat, image_tokens=5, system=None)
    enc = lambda s: tok.tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    img = [tok.vision_start] + [tok.image_pad] * 5 + [tok.vision_end]
    want = [tok.im_start] + enc("user\n") + img + enc("\nWhat is in ") + img + enc("?") + [tok.im_end] + enc("\n")
    assert ids[:len(want)] == want
    assert ids.count(tok.image_pad) == 10 and all(l == -100 for l in labels[:len(want)])
    assert tok.chat_lengths([chat], image_tokens=5, system=None) == [len(ids)]
    assert tok.chat_lengths([chat, chat[:1]], image_tokens=64) == \
        [len(tok.encode_chat(c, image_tokens=64)[0]) for c in (chat, chat[:1])]
    assert tok.chat_lengths(CHATS, image_tokens=7) == [len(tok.encode_chat(c, image_tokens=7)[0]) for c in CHATS]


def test_special_ids_roundtrip_and_save(tok, tmp_path):
    vocab = tok.tok.get_vocab()
    for name, attr in [("<|im_start|>", "im_start"), ("<|im_end|>", "im_end"), ("<|endoftext|>", "pad"),
                       ("<|vision_start|>", "vision_start"), ("<|vision_end|>", "vision_end"),
                       ("<|image_pad|>", "image_pad"), ("<num>", "num")]:
        assert getattr(tok, attr) == vocab[name]
    s = "Ünïcödé ¥12.50 世界 😀 \n\n\t tabs  and   spaces"  # characters the BPE never merged: bytes
    assert tok.decode(tok.encode(s)) == s
    tok.save(tmp_path)
    tok2 = Tokenizer.from_dir(tmp_path)
    assert tok2.encode(s) == tok.encode(s) and tok2.num == tok.num and tok2.vocab_size == tok.vocab_size


def test_num_added_when_missing(tmp_path):
    # a Qwen-like tokenizer.json without <num>: it is appended as a new special token after the vocab
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>"]
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n = raw.get_vocab_size(with_added_tokens=True)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.num == n and tok.vocab_size == n + 1 and tok.image_pad == 7
    assert tok.encode("x <num> y").count(n) == 1
