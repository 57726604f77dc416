"""
Rewards: how GRPO scores a completion, and the string distances behind the scores.

GRPO (grpo.py) samples a group of completions per prompt, scores each one with plain Python functions and
pushes the model toward the completions that scored above their group's average. A reward function is
anything with this interface:

    fn(completions: list[str], solutions: list[str], **columns) -> list[float]   # one score per completion

`columns` carries the dataset's other per-sample columns (question type, image path, ...) so a reward can
depend on them; functions that do not care accept and ignore **columns.

Built in (REWARD_FUNCS):
  ocr      1 - weighted character error rate of the answer, floored at 0: partial credit for near misses,
           with digits and currency signs weighted double (in a receipt "¥476.0" read as "¥47.0" is a
           worse mistake than "Total" read as "Tota1" would be if letters counted the same)
  format   1 if the completion is <think>...</think> then <answer>...</answer> and nothing else
  exact    1 if the answer equals the solution exactly
  numeric  how close the numbers in the answer are to the solution's numbers

Your own rewards live in a .py file (load_reward_plugin) and are mixed with weights (combine_rewards).

The weighted edit distance. The cheapest way to turn hyp into ref by deleting, inserting and substituting
characters, where each character c has a weight w(c) (important_weight for digits and currency signs, 1
otherwise): deleting or inserting c costs w(c), substituting a by b costs max(w(a), w(b)), keeping an equal
character costs 0. It is the classic Levenshtein dynamic programme with those costs in the recurrence, so
the alignment chosen is the cheapest under the weights. (Finding the unit-cost alignment first and then
weighting its mistakes is a different, wrong number: the weights must steer which alignment is chosen.)
"""

import hashlib
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

from nanovlm.numeric import NUMBER, parse_numbers

IMPORTANT_CHARS = "0123456789¥$"


# ----------------------------------------------------------------------------------------------------------
# String distances

def weighted_edit_distance(ref, hyp, important_chars=IMPORTANT_CHARS, important_weight=2.0):
    """Least total cost turning hyp into ref (see the module docstring for the costs). O(len(ref) * len(hyp))."""
    def w(c):
        return important_weight if c in important_chars else 1.0

    # prev[j] = cost of turning hyp[:j] into ref[:i-1]; one row at a time keeps memory O(len(hyp)).
    prev = [0.0]
    for b in hyp:
        prev.append(prev[-1] + w(b))  # ref empty: delete every hyp character
    for a in ref:
        cur = [prev[0] + w(a)]  # hyp empty: insert every ref character
        for j, b in enumerate(hyp, start=1):
            cur.append(min(
                prev[j - 1] + (0.0 if a == b else max(w(a), w(b))),  # keep a == b, or substitute b -> a
                prev[j] + w(a),                                      # insert a
                cur[j - 1] + w(b),                                   # delete b
            ))
        prev = cur
    return prev[-1]


def weighted_cer(ref, hyp, important_chars=IMPORTANT_CHARS, important_weight=2.0):
    """Weighted character error rate: weighted_edit_distance / total weight of ref.

    0.0 when both are empty, 1.0 when ref is empty and hyp is not (there is nothing to normalise by, and any
    output is entirely wrong). Can exceed 1 when hyp is much longer than ref; the ocr reward floors at 0.
    """
    total = sum(important_weight if c in important_chars else 1.0 for c in ref)
    if total == 0:
        return 0.0 if len(hyp) == 0 else 1.0
    return weighted_edit_distance(ref, hyp, important_chars, important_weight) / total


def levenshtein(a, b):
    """Plain edit distance: every insertion, deletion and substitution costs 1."""
    return int(weighted_edit_distance(a, b, important_chars=""))


def text_accuracy(pred, label):
    """1 - levenshtein / max(len(pred), len(label)), in [0, 1]; 1.0 when both are empty."""
    n = max(len(pred), len(label))
    return 1.0 if n == 0 else 1.0 - levenshtein(pred, label) / n


# ----------------------------------------------------------------------------------------------------------
# Parsing completions

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# <think>...</think> then <answer>...</answer>, whitespace around and between, nothing else. The tempered
# dots ((?!...).) stop a tag's body from swallowing another copy of the same tag, so
# "<answer>a</answer> junk </answer>" does not pass as one long answer.
FORMAT_RE = re.compile(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.DOTALL)
# A plain number: optional sign, digits with an optional decimal part (or ".5"), optional exponent.
# No thousands separators: "1,234" reads as the two numbers 1 and 234.
# The same grammar as numeric.py's <num><v> markup, whose parser reads the marked numbers.
NUMBER_RE = re.compile(NUMBER)


def extract_answer(completion):
    """The text inside the last <answer>...</answer>, stripped; the whole completion, stripped, if there is none.

    The last one, because a model may mention the tag while thinking before it commits to an answer.
    """
    found = ANSWER_RE.findall(completion)
    return (found[-1] if found else completion).strip()


def extract_numbers(text):
    """The numbers in text: the values of its <num><v> markup if it has any, else every plain number."""
    _, marked = parse_numbers(text, strict=False)   # a completion's malformed markup is just not a number
    return marked if marked else [float(v) for v in NUMBER_RE.findall(text)]


# ----------------------------------------------------------------------------------------------------------
# Reward functions: fn(completions, solutions, **columns) -> list[float]

def _check_pairs(name, completions, solutions):
    if len(completions) != len(solutions):
        raise ValueError(f"reward {name!r}: {len(completions)} completions but {len(solutions)} solutions")


def reward_ocr(completions, solutions, **columns):
    """max(0, 1 - weighted_cer(solution, answer)): digits and currency signs count double."""
    _check_pairs("ocr", completions, solutions)
    return [max(0.0, 1.0 - weighted_cer(s.strip(), extract_answer(c))) for c, s in zip(completions, solutions)]


def reward_format(completions, solutions, **columns):
    """1.0 if the completion is <think>...</think> followed by <answer>...</answer> (multi-line bodies fine,
    whitespace around and between the blocks fine, any other text outside them not), else 0.0."""
    _check_pairs("format", completions, solutions)
    return [1.0 if FORMAT_RE.fullmatch(c) else 0.0 for c in completions]


def reward_exact(completions, solutions, **columns):
    """1.0 if the extracted answer equals the solution after stripping whitespace (case-sensitive), else 0.0."""
    _check_pairs("exact", completions, solutions)
    return [float(extract_answer(c) == s.strip()) for c, s in zip(completions, solutions)]


def reward_numeric(completions, solutions, **columns):
    """Closeness of the numbers in the answer to those in the solution, in [0, 1].

    Numbers come from extract_numbers, applied to the extracted answer and to the solution separately (each
    uses <num><v> markup if it has any, else plain numbers). They are paired in order, and each pair scores
    max(0, 1 - |p - s| / max(|s|, 1e-8)): relative error, so 101 for 100 scores 0.99, and a solution of 0
    needs an exact 0. The reward is the mean over the pairs; 0.0 if either side has no numbers, if the counts
    differ (a missing or extra number is a wrong answer, not a partial one), or for a non-finite value.
    """
    _check_pairs("numeric", completions, solutions)
    out = []
    for c, s in zip(completions, solutions):
        pred, true = extract_numbers(extract_answer(c)), extract_numbers(s)
        if not true or len(pred) != len(true):
            out.append(0.0)
            continue
        scores = [max(0.0, 1.0 - abs(p - t) / max(abs(t), 1e-8)) if math.isfinite(p) and math.isfinite(t) else 0.0
                  for p, t in zip(pred, true)]
        out.append(sum(scores) / len(scores))
    return out


# The one registry: name -> reward function. load_reward_plugin adds to it; combine_rewards reads it.
REWARD_FUNCS = {
    "ocr": reward_ocr,
    "format": reward_format,
    "exact": reward_exact,
    "numeric": reward_numeric,
}


# ----------------------------------------------------------------------------------------------------------
# User rewards and mixing

def load_reward_plugin(path, registry=None):
    """Import the .py file at path and register its reward functions in registry (REWARD_FUNCS by default).

    Registered: every entry of the file's own REWARD_FUNCS dict, under its key; or, if it has none, every
    public function whose name starts with "reward_", under its full function name ("reward_length").
    Returns {name: function} for what this file added. A name already registered by another file (or a
    built-in) is an error; loading the same file again replaces its own entries.
    """
    registry = REWARD_FUNCS if registry is None else registry
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward plugin {path}: no such file")
    # A module name unique per file, so two plugins that are both called rewards.py do not collide.
    name = "nanovlm_reward_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SyntaxError(f"reward plugin {path}, line {e.lineno}: {e.msg}") from e
    except Exception as e:
        raise RuntimeError(f"reward plugin {path} failed while importing: {type(e).__name__}: {e}") from e
    sys.modules[name] = module  # so the functions' module can be found by name, like any imported one

    if hasattr(module, "REWARD_FUNCS"):
        found = module.REWARD_FUNCS
        if found is registry or found is REWARD_FUNCS:
            raise ValueError(f"reward plugin {path}: its REWARD_FUNCS is nanovlm's own registry (imported); "
                             "define a new dict of your functions instead")
        if not isinstance(found, dict):
            raise TypeError(f"reward plugin {path}: REWARD_FUNCS must be a dict name -> function, "
                            f"got {type(found).__name__}")
    else:
        found = {n: f for n, f in vars(module).items()
                 if n.startswith("reward_") and inspect.isfunction(f) and f.__module__ == name}
    if not found:
        raise ValueError(f"reward plugin {path}: defines no REWARD_FUNCS dict and no function named reward_*")

    origin = str(path.resolve())
    for key, fn in found.items():
        if not isinstance(key, str) or not callable(fn):
            raise TypeError(f"reward plugin {path}: REWARD_FUNCS[{key!r}] must map a str to a function")
        old = registry.get(key)
        # A clash unless it is the very same function, or the entry came from this same file (a reload).
        if old is not None and old is not fn and getattr(old, "_nanovlm_plugin", None) != origin:
            where = getattr(old, "_nanovlm_plugin", None) or getattr(old, "__module__", "another module")
            raise ValueError(f"reward plugin {path}: reward {key!r} is already registered by {where}")
    for key, fn in found.items():
        if getattr(fn, "__module__", None) == name:  # tag only what the plugin itself defines
            fn._nanovlm_plugin = origin
        registry[key] = fn
    return dict(found)


def _score(name, score, i, columns):
    """One reward as a finite float; anything else (None, a string, NaN, inf) is an error naming the reward
    function and the sample (columns["where"], when the data gave one): a NaN reward would turn the whole
    batch's advantages, then the loss, into NaN."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        where = columns.get("where")
        sample = f" (sample {where[i]})" if isinstance(where, (list, tuple)) else ""
        raise ValueError(f"reward {name!r} returned {score!r} for completion {i}{sample}: a reward must be a "
                         "finite number; fix the reward function")
    return value


def combine_rewards(names, weights, completions, solutions, **columns):
    """Score every completion with each named reward and mix them: total[i] = sum_k weights[k] * r_k[i].

    weights=None weighs every reward 1. Returns (total, {name: scores}), the per-function scores for logging.
    Per-sample columns (lists/tuples) must have one entry per completion. A score that is not a finite number
    is an error naming the reward function and the sample.
    """
    names = list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if not names:
        raise ValueError("combine_rewards: no reward names given")
    if len(set(names)) != len(names):
        raise ValueError(f"combine_rewards: a reward is named twice in {names}")
    if len(weights) != len(names):
        raise ValueError(f"combine_rewards: {len(names)} reward names but {len(weights)} weights")
    n = len(completions)
    if len(solutions) != n:
        raise ValueError(f"combine_rewards: {n} completions but {len(solutions)} solutions")
    for key, col in columns.items():
        if isinstance(col, (list, tuple)) and len(col) != n:
            raise ValueError(f"combine_rewards: column {key!r} has {len(col)} entries for {n} completions")

    per_function = {}
    for name in names:
        if name not in REWARD_FUNCS:
            raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARD_FUNCS)}")
        scores = REWARD_FUNCS[name](completions, solutions, **columns)
        if scores is None or len(scores) != n:
            raise ValueError(f"reward {name!r} returned {'None' if scores is None else f'{len(scores)} scores'} "
                             f"for {n} completions: it must return one number per completion")
        per_function[name] = [_score(name, s, i, columns) for i, s in enumerate(scores)]
    total = [sum(w * per_function[name][i] for name, w in zip(names, weights)) for i in range(n)]
    return total, per_function
