"""
Numbers as values: the `<num><value>` markup, a value embedding on the way in and a regression head on the
way out.

A language model writes 1234.56 as six or seven tokens ("1", "2", "3", "4", ".", "5", "6") and has to guess
each digit: a near miss in the first digit is as wrong as a miss in the last, and nothing tells the model that
1234 is close to 1235. A model reading a chart should instead *regress* the number. Answers mark numbers as

    销售额：<num><1234.56>万元，增长率：<num><15.8>%

and each `<num><v>` becomes ONE special token `<num>` carrying the float v beside the token stream:

    parse_numbers("销售额：<num><1234.56>万元")  ->  ("销售额：<num>万元", [1234.56])
    format_numbers("销售额：<num>万元", [1234.56])  ->  "销售额：<num><1234.56>万元"

Three pieces of model make the values flow, all on the language-model side (text-only samples work too):

    input   the embedding at a `<num>` position = the `<num>` token embedding + ValueEmbedding(t(v)),
            an MLP 1 -> hidden -> lm_hidden of the transformed value t(v)
    output  NumericHead: lm_hidden -> 1, read at the position whose NEXT token is `<num>`, i.e. the very
            hidden state whose logits predict `<num>`. Training and generation are causal and consistent:
            when sampling picks `<num>`, the value comes from the same hidden state, then is fed back in
            through the value embedding at the `<num>` position, exactly as in training.
    loss    total = token_ce + alpha * numeric_mse, the MSE between the head's output and t(v) over every
            trained number in the batch (numbers in the assistant's answers; numbers the user writes are
            input only, as the user's words are).

The transform t squashes the range: "symlog" (default) is sign(x) * log1p(|x|), so 0.5 and 5e6 both become
numbers of order 1 to 15; for |x| >> 1 its slope 1/(1+|x|) turns an error into a relative one (10% off costs
the same at 100 and at 1e6), while below 1 it stays close to x (absolute errors). "identity" regresses the
raw value, where the largest numbers dominate the MSE.

WithNumericHead (at the end of this file) plugs these pieces into a model of either family: NumericVLM is the SigLIP
VLM with them, NumericQwen25VL Qwen2.5-VL; a checkpoint whose config has "numeric" loads as one
(VLM.from_pretrained, Qwen25VL.from_pretrained).
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.qwen2_5_vl import Qwen25VL
from nanovlm.vlm import VLM

NUM_TOKEN = "<num>"
# A float: optional sign, digits with an optional decimal part (or ".5"), optional exponent. No thousands
# separators and no inf/nan: a regression target must be a finite number.
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# "<num><3.25>"; spaces are tolerated inside and between the brackets ("<num> < 3.25 >").
MARKUP_RE = re.compile(r"<num>\s*<\s*(" + NUMBER + r")\s*>")

# -----------------------------------------------------------------------------
# text <-> (text with <num> tokens, values)


def _scan(text, where, strict):
    """Yield (start, end, value string) for each <num><v> in text. A <num> not followed by a valid <v>, or a value
    beyond float range, is an error naming `where` (strict) or skipped / inf (not strict: e.g. a model's
    completion being scored, where rewards.reward_numeric scores a non-finite value 0)."""
    pos = 0
    while (i := text.find(NUM_TOKEN, pos)) != -1:
        m = MARKUP_RE.match(text, i)
        if m is None:
            if strict:
                snippet = text[i:i + 24] + ("..." if len(text) > i + 24 else "")
                raise ValueError(f"{where or 'text'}: malformed number at character {i}: {snippet!r}; expected "
                                 "<num><value> with a finite decimal value, e.g. <num><-1.5e3>")
            pos = i + len(NUM_TOKEN)
            continue
        if strict and not math.isfinite(float(m.group(1))):
            raise ValueError(f"{where or 'text'}: number {m.group(1)!r} at character {i} is too large for a float "
                             "(it overflows to inf); a regression target must be a finite number")
        yield m.start(), m.end(), m.group(1)
        pos = m.end()


def parse_numbers(text, where=None, strict=True):
    """text -> (text with each <num><v> replaced by <num>, [v as floats in reading order]).
    where: the sample's name for error messages ("data.json:12")."""
    out, values, last = [], [], 0
    for start, end, v in _scan(text, where, strict):
        out += [text[last:start], NUM_TOKEN]
        values.append(float(v))
        last = end
    return "".join(out) + text[last:], values


def strip_numbers(text, where=None):
    """<num><v> -> v as written ("<num><1234.56>万元" -> "1234.56万元"): the same data as plain digits, for a
    model without the numeric head. Malformed markup is the same error as in parse_numbers."""
    out, last = [], 0
    for start, end, v in _scan(text, where, True):
        out += [text[last:start], v]
        last = end
    return "".join(out) + text[last:]


def split_numbers(messages, numeric, where=None):
    """The <num><v> markup of a conversation, for a model with the numeric head (numeric=True: each becomes a
    <num> token and its value is collected, in reading order) or without one (the digits as written).
    Returns (messages, values); values is [] when numeric is False."""
    out, values = [], []
    for m in messages:
        if numeric:
            text, v = parse_numbers(m["content"], where)
            values += v
        else:
            text = strip_numbers(m["content"], where)
        out.append({**m, "content": text})
    return out, values


def format_value(v):
    """Shortest text that reads back as exactly v: 3 for 3.0, else Python's repr (1234.56, -1.5e-07)."""
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"cannot write the non-finite value {v} as <num><v>")
    return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)


def format_numbers(text, values):
    """The inverse of parse_numbers: the i-th <num> in text becomes <num><values[i]>."""
    parts = text.split(NUM_TOKEN)
    if len(parts) - 1 != len(values):
        raise ValueError(f"text has {len(parts) - 1} {NUM_TOKEN} token(s) but {len(values)} value(s)")
    out = [parts[0]]
    for v, part in zip(values, parts[1:]):
        out += [f"{NUM_TOKEN}<{format_value(v)}>", part]
    return "".join(out)


def decode_numeric(tokenizer, token_ids, predictions):
    """One row of NumericVLM.generate_numbers' output -> (text with <num><v> rendered, [{"value", "position"}]).
    position is the index of the <num> token in token_ids (the generated tokens)."""
    text = tokenizer.decode(token_ids)
    return format_numbers(text, [p["value"] for p in predictions]), [dict(p) for p in predictions]

# -----------------------------------------------------------------------------
# value transforms


def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(y):
    return torch.sign(y) * torch.expm1(y.abs())


TRANSFORMS = {"symlog": (symlog, symexp), "identity": (lambda x: x, lambda y: y)}

# -----------------------------------------------------------------------------
# the model pieces


@dataclass
class NumericConfig:
    num_token_id: int                  # the <num> token's id in the tokenizer
    lm_hidden: int = 0                 # the LM's width (set by VLMConfig)
    hidden: int = 512                  # width of the value-embedding MLP (1 -> hidden -> lm_hidden)
    transform: str = "symlog"          # symlog | identity: the space values are embedded and regressed in
    loss_weight: float = 1.0           # alpha in total = token_ce + alpha * numeric_mse

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown numeric transform {self.transform!r} (expected one of {', '.join(TRANSFORMS)})")


class ValueEmbedding(nn.Module):
    """t(v) (N,) -> (N, lm_hidden), added to the <num> token's embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(1, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.lm_hidden)
        # Start small, like the token embeddings (std 0.02), so the value embedding starts on the token's scale.
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, t):
        return self.proj(F.gelu(self.fc(t[:, None])))


class NumericHead(nn.Module):
    """Final normed hidden states (..., lm_hidden) -> the predicted t(v) (...)."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Linear(cfg.lm_hidden, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h).squeeze(-1)


class Numeric(nn.Module):
    """Both ends of the value path, in the transform's space: embed(values), predict(h) -> t(v), decode -> v."""

    def __init__(self, cfg: NumericConfig):
        super().__init__()
        self.cfg = cfg
        self.value_embed = ValueEmbedding(cfg)
        self.head = NumericHead(cfg)
        self.forward_t, self.inverse_t = TRANSFORMS[cfg.transform]

    def embed(self, values):
        """Raw values (N,) -> embeddings (N, lm_hidden)."""
        return self.value_embed(self.forward_t(values.to(self.head.proj.weight.dtype)))

    def predict(self, h):
        """Hidden states (..., lm_hidden) -> predictions in the transform's space (...)."""
        return self.head(h)

    def decode(self, t):
        """Transform space -> raw values."""
        return self.inverse_t(t.float())

    def loss(self, h, values, denominator=None):
        """Squared error between the head at hidden states h (N, lm_hidden) and the transformed targets (N,), in
        fp32, summed and divided by `denominator` (default N: the MSE). With no numbers it is a 0 still tied to
        the head, so every parameter gets a (zero) gradient."""
        pred = self.predict(h).float()                                   # (N,)
        se = (pred - self.forward_t(values.float())).pow(2).sum()
        return se / (max(pred.numel(), 1) if denominator is None else denominator)


def numeric_loss(token_ce, numeric_mse, alpha):
    """total = token_ce + alpha * numeric_mse (both parts are logged separately by the trainer)."""
    return token_ce + alpha * numeric_mse


# -----------------------------------------------------------------------------
# the VLM with the head


class WithNumericHead:
    """The head on a vision-language model of either family (a mixin: NumericVLM is the SigLIP VLM with it,
    NumericQwen25VL Qwen2.5-VL): embed() adds the value embedding at each <num>, forward() adds alpha * the MSE
    of the head read at the position before each trained <num>, and generation feeds the head's value back in
    whenever the model emits <num>. Each method does its part and calls the model's own (super()) for the rest,
    so the two families share every line of it; what it needs of a model: embed, states, outputs, loss_counts,
    step_embed, generate (vlm.py, qwen2_5_vl.py).

    num_values: one float per <num> token of the batch, in reading order (row by row), as data.collate makes.
    """

    def __init__(self, cfg, lm=None, vision=None, projector=None):
        super().__init__(cfg, lm, vision, projector)
        if isinstance(cfg.numeric, dict):
            cfg.numeric = NumericConfig(**cfg.numeric)
        cfg.numeric.lm_hidden = cfg.lm.hidden_size
        self.numeric = Numeric(cfg.numeric)
        self._generated_values = None   # per decoding step, the head's (B,) values (see generate_numbers)

    @classmethod
    def from_vlm(cls, vlm, numeric_cfg):
        """Add a fresh head to a model trained without one (e.g. SFT from a pretrain checkpoint); cls: the numeric
        class of the model's family."""
        vlm.cfg.numeric = numeric_cfg
        w = vlm.lm.embed_tokens.weight
        return cls(vlm.cfg, vlm.lm, vlm.vision, vlm.projector).to(device=w.device, dtype=w.dtype).train(vlm.training)

    def embed(self, input_ids, *images, num_values=None, **kw):
        """The model's embeddings + the value embedding of each <num>'s value at its position. (B, T) -> (B, T, C)."""
        x = super().embed(input_ids, *images, **kw)                             # (B, T, C)
        is_num = input_ids == self.cfg.numeric.num_token_id                      # (B, T)
        values = torch.zeros(0) if num_values is None else torch.as_tensor(num_values)
        if int(is_num.sum()) != values.numel():
            raise ValueError(f"numbers do not match values: the text has {is_num.sum(1).tolist()} <num> tokens per "
                             f"row but {values.numel()} value(s) were given")
        ve = self.numeric.embed(values.to(x.device).reshape(-1)).to(x.dtype)    # (N, C)
        # Always computed, even for N = 0, so the value embedding is in the graph of every batch (DDP).
        return x.masked_scatter(is_num[..., None], x[is_num] + ve)

    def forward(self, input_ids, *images, labels=None, num_values=None, n_label_tokens=None, n_numbers=None, **inputs):
        """images and inputs as the model's forward takes them (pixel_values, attention_mask, packing; Qwen2.5-VL's
        image_grid_thw). Without labels: {"logits", "numeric"} (the head's value at every position, (B, T)). With
        labels: {"loss" = token_ce + alpha * numeric_mse, "token_ce", "numeric_mse", "n_tokens", "n_numbers"}; the
        MSE is summed over the trained numbers and divided by n_numbers (default: this batch's count; see
        VLM.forward for why the training loop passes the global batch's)."""
        h = self.states(input_ids, *images, num_values=num_values, **inputs)              # (B, T, C)
        out = self.outputs(h, labels, n_label_tokens)
        if labels is None:
            out["numeric"] = self.numeric.decode(self.numeric.predict(h))              # (B, T)
            return out
        # The value of a trained <num> at t+1 is regressed from h[t], the state whose logits predict <num>.
        is_num = input_ids == self.cfg.numeric.num_token_id                            # (B, T)
        trained = is_num & (labels != -100)
        trained[:, 0] = False                                                          # nothing precedes it
        values = torch.as_tensor(num_values if num_values is not None else []).to(h.device).reshape(-1)
        n = trained.sum()
        mse = self.numeric.loss(h[:, :-1][trained[:, 1:]], values[trained[is_num]],   # (N_num, C), (N_num,)
                                n.clamp(min=1) if n_numbers is None else n_numbers)
        out.update(token_ce=out["loss"], numeric_mse=mse, n_numbers=n,
                   loss=numeric_loss(out["loss"], mse, self.cfg.numeric.loss_weight))
        return out

    def loss_counts(self, batch):
        trained = (batch["input_ids"] == self.cfg.numeric.num_token_id) & (batch["labels"] != -100)
        return {**super().loss_counts(batch), "n_numbers": int(trained[:, 1:].sum())}

    def step_embed(self, nxt, h):
        """The chosen token's embedding, plus, where it is <num>, the value embedding of what the head reads from
        the same states h that chose <num> (as training feeds in the true value)."""
        x = super().step_embed(nxt, h)                                                 # (B, 1, C)
        # Rounded to float32's ~7 significant digits, so the rendered text is short and exact.
        values = torch.tensor([float(f"{v:.7g}") for v in self.numeric.decode(self.numeric.predict(h)).tolist()],
                              device=x.device)                                         # (B,)
        if self._generated_values is not None:
            self._generated_values.append(values.tolist())
        is_num = (nxt == self.cfg.numeric.num_token_id)[:, None, None]                 # (B, 1, 1)
        return torch.where(is_num, x + self.numeric.embed(values).to(x.dtype)[:, None], x)

    @torch.no_grad()
    def generate_numbers(self, prompts, pixel_values=None, num_values=None, **kw):
        """generate (num_values: the prompts' <num> values in reading order; kw: generate's, Qwen2.5-VL's
        image_grid_thw too), plus the values the head gave each generated <num>: returns (new-token lists,
        predictions), predictions[b] a list of {"value", "position": index of that <num> in row b's new tokens}.
        decode_numeric renders a row as <num><v> text."""
        self._generated_values = []
        try:
            tokens = self.generate(prompts, pixel_values=pixel_values, num_values=num_values, **kw)
            steps = self._generated_values
        finally:
            self._generated_values = None
        # Row b's k-th new token was chosen at decoding step k, and step_embed saw that step's values.
        num = self.cfg.numeric.num_token_id
        preds = [[{"value": steps[k][b], "position": k} for k, t in enumerate(row) if t == num]
                 for b, row in enumerate(tokens)]
        return tokens, preds


class NumericVLM(WithNumericHead, VLM):
    """The SigLIP VLM with the numeric head; a checkpoint whose config has "numeric" loads as one."""


class NumericQwen25VL(WithNumericHead, Qwen25VL):
    """Qwen2.5-VL with the numeric head; its checkpoint is the hub layout plus the head's tensors (numeric.*),
    which transformers skips."""
