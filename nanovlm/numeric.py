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
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """One row of VLM.generate's numeric output -> (text with <num><v> rendered, [{"value", "position"}]).
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

    def loss(self, h, values):
        """MSE between the head at hidden states h (N, lm_hidden) and the transformed targets (N,), in fp32.
        With no numbers it is a 0 still tied to the head, so every parameter gets a (zero) gradient."""
        pred = self.predict(h).float()                                   # (N,)
        if pred.numel() == 0:
            return pred.sum() * 0.0
        return F.mse_loss(pred, self.forward_t(values.float()))


def numeric_loss(token_ce, numeric_mse, alpha):
    """total = token_ce + alpha * numeric_mse (both parts are logged separately by the trainer)."""
    return token_ce + alpha * numeric_mse
