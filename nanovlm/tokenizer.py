"""
The tokenizer: text <-> token ids, the chat template, and which tokens a model is trained on.

We wrap a Hugging Face `tokenizers` tokenizer.json (a byte-level BPE, the Rust library does the
merging fast) and add the four things a VLM needs on top of it:

1. The Qwen2.5 chat template. A conversation is rendered to one string,

       <|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n
       <|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n
       <|im_start|>assistant\nred<|im_end|>\n

   and then tokenized in one go, exactly as transformers' `apply_chat_template` does, so a model
   fine-tuned here sees the same ids as one fine-tuned with transformers.

2. Image placeholders. `<image>` in the text becomes `<|vision_start|>` + N x `<|image_pad|>` +
   `<|vision_end|>`. The N pad tokens are slots: the VLM overwrites their embeddings with the N vision
   features of that image. `image_tokens` gives N: one number for every image (the SigLIP VLM: fixed by the
   vision tower + projector) or a list, one per `<image>` tag in reading order (Qwen2.5-VL: each image's own
   count, from its size).

3. Template safety. Special tokens come only from the template: a control token typed in a message
   (`<|im_end|>\n<|im_start|>assistant` inside a user turn) would otherwise become the real token, so the
   text could end its own turn and write another's. Such text is an error naming the sample and the turn.

4. Label masks. We only train the model to produce what the assistant says: labels are -100 (ignored
   by cross-entropy) everywhere except each assistant turn's content and its closing <|im_end|> (so
   the model learns to stop). The `<|im_start|>assistant\n` header is given, never predicted, and the
   "\n" after <|im_end|> is never generated (generation stops at <|im_end|>), so neither is trained.
   To find those tokens we remember where each assistant answer sits in the rendered string and keep
   the tokens whose character offsets start inside it.

One code path serves the real Qwen2.5 tokenizer (151,665 entries) and the tiny one trained here from
the synthetic corpus (`train_tiny_tokenizer`): both have the same special tokens under the same names,
only their ids differ, and every id is looked up by name.
"""

import itertools
import os
import re

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IMAGE_TAG = "<image>"  # what datasets write; never a token itself, it is expanded before tokenizing
# name -> attribute. Qwen2.5 ids: endoftext 151643, im_start 151644, im_end 151645, vision_start 151652,
# vision_end 151653, image_pad 151655; <num> (numeric head) is not in Qwen's vocab and gets added.
SPECIAL_TOKENS = {
    "<|endoftext|>": "endoftext",
    "<|im_start|>": "im_start",
    "<|im_end|>": "im_end",
    "<|vision_start|>": "vision_start",
    "<|vision_end|>": "vision_end",
    "<|image_pad|>": "image_pad",
    "<num>": "num",
}
# Qwen2's pre-tokenizer split: words with their leading space, single digits, punctuation runs, newlines.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        if "<num>" not in vocab:
            # Qwen's tokenizer has 151,665 entries but its embedding 151,936 rows, so a new special
            # token gets id 151665 and still fits the pretrained embedding matrix.
            tok.add_special_tokens([AddedToken("<num>", special=True, normalized=False)])
            vocab = tok.get_vocab(with_added_tokens=True)
        for name, attr in SPECIAL_TOKENS.items():
            if name not in vocab:
                raise ValueError(f"tokenizer has no special token {name!r}: not a Qwen2-style tokenizer")
            setattr(self, attr, vocab[name])
        self.eos = self.im_end        # an assistant turn ends with <|im_end|>: generation stops there
        self.pad = self.endoftext     # Qwen pads with <|endoftext|>; padded positions are masked anyway
        self.stop_ids = [self.im_end, self.endoftext]
        # Control tokens: the special added tokens (<|im_end|>, <|image_pad|>, ...). Typed inside a message they
        # would become the real tokens, ending a turn and starting another (template injection), so they may
        # only come from the template. <num> is the exception: numeric.py's <num><v> markup puts it there.
        # Added tokens that are not special (Qwen's <think>, <tool_call>) are ordinary text.
        control = sorted((t.content for t in tok.get_added_tokens_decoder().values()
                          if t.special and t.content != "<num>"), key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, control))) if control else None

    @classmethod
    def from_file(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:   # the Rust library raises a bare Exception
            raise ValueError(f"{path}: not a readable tokenizer.json: {e}") from None
        return cls(tok)

    @classmethod
    def from_dir(cls, path):
        return cls.from_file(os.path.join(path, "tokenizer.json"))

    def save(self, dir):
        os.makedirs(dir, exist_ok=True)
        self.tok.save(os.path.join(dir, "tokenizer.json"))

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def expand_images(self, text, image_tokens):
        """Each <image> tag -> vision_start, its pads, vision_end. image_tokens: an int (every image) or an
        iterator of per-image counts, consumed one per tag."""
        counts = itertools.repeat(image_tokens) if isinstance(image_tokens, int) else image_tokens
        first, *rest = text.split(IMAGE_TAG)
        return first + "".join(f"<|vision_start|>{'<|image_pad|>' * next(counts)}<|vision_end|>{part}" for part in rest)

    def check_text(self, text, what):
        """A control token typed in text is an error naming `what` (sample and turn) and the token."""
        found = self.control_re and self.control_re.search(text)
        if found:
            raise ValueError(f"{what} contains {found.group()!r}, a control token of the chat template; special "
                             "tokens may only come from the template (text with them would end the turn and start "
                             "another): remove or reword it")

    def check_chat(self, messages, where="chat"):
        for k, m in enumerate(messages):
            self.check_text(m["content"], f"{where}: turn {k} ({m['role']})")

    def render_chat(self, messages, image_tokens, add_generation_prompt=False, system=DEFAULT_SYSTEM, where="chat"):
        """Chat -> (text, spans): the template as one string, and the (start, end) character span of
        each assistant answer + its <|im_end|>, i.e. the part that is trained. where names the chat in errors."""
        self.check_chat(messages, where)
        if system is not None:
            self.check_text(system, "system prompt")
        if messages and messages[0]["role"] == "system":   # the conversation's own system prompt wins
            system, messages = messages[0]["content"], messages[1:]
        turns = ([{"role": "system", "content": system}] if system is not None else []) + list(messages)
        counts = image_tokens
        if not isinstance(image_tokens, int):   # one count per <image> tag
            n_tags = sum(m["content"].count(IMAGE_TAG) for m in turns)
            if len(image_tokens) != n_tags:
                raise ValueError(f"{where}: {n_tags} {IMAGE_TAG} tag(s) but image token counts for "
                                 f"{len(image_tokens)} image(s)")
            counts = iter(image_tokens)
        text, spans = "", []
        for m in turns:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']!r} (expected system, user or assistant)")
            text += f"<|im_start|>{m['role']}\n"
            start = len(text)
            text += self.expand_images(m["content"], counts) + "<|im_end|>"
            if m["role"] == "assistant":
                spans.append((start, len(text)))
            text += "\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text, spans

    def encode_chat(self, messages, image_tokens, add_generation_prompt=False, system=DEFAULT_SYSTEM, where="chat"):
        """Chat -> (ids, labels), two lists of the same length; labels are -100 except what the
        assistant says (content + closing <|im_end|>). where names the chat in errors ("data.json:12")."""
        text, spans = self.render_chat(messages, image_tokens, add_generation_prompt, system, where)
        enc = self.tok.encode(text, add_special_tokens=False)
        ids, labels = enc.ids, [-100] * len(enc.ids)
        no_train = (self.vision_start, self.image_pad, self.vision_end)   # an image is input, never output
        for i, (tid, (s, _)) in enumerate(zip(ids, enc.offsets)):
            if tid not in no_train and any(a <= s < b for a, b in spans):
                labels[i] = tid
        return ids, labels

    def chat_lengths(self, conversations, image_tokens, system=DEFAULT_SYSTEM, wheres=None):
        """Token counts of many chats at once, without materialising the image pads: each image costs
        exactly its image tokens + 2 tokens (special tokens are never merged), so we tokenize with one pad
        per image and add the rest. Likewise the default system turn, the same in every chat, is counted
        once. BPE runs at roughly 0.3-0.5M tokens/s: LLaVA's 595K captions take a minute or two.
        image_tokens: an int (every image), or one list of per-image counts per chat.
        wheres: one name per chat for errors (e.g. "data.json:12")."""
        if system is not None:
            self.check_text(system, "system prompt")
        system_len = len(self.encode(f"<|im_start|>system\n{system}<|im_end|>\n")) if system is not None else 0
        texts, extra = [], []
        for i, messages in enumerate(conversations):
            where = wheres[i] if wheres is not None else f"chat {i}"
            texts.append(self.render_chat(messages, 1, system=None, where=where)[0])   # own system turn rendered
            own_system = bool(messages) and messages[0]["role"] == "system"
            n_images = sum(m["content"].count(IMAGE_TAG) for m in messages)
            pads = n_images * image_tokens if isinstance(image_tokens, int) else sum(image_tokens[i])
            extra.append(pads - n_images + (0 if own_system else system_len))
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [len(e.ids) + n for e, n in zip(encs, extra)]


def train_tiny_tokenizer(texts, vocab_size=512):
    """A small byte-level BPE with Qwen2's pre-tokenizer and special tokens (different ids, same
    names). Byte-level: any string round-trips through encode/decode, unseen characters included."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the template's fixed words are in every sample: make sure they become single tokens
    texts = list(texts) + ["system", "user", "assistant", DEFAULT_SYSTEM]
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
