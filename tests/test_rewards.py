"""rewards.py against independent references: brute force over every edit script, and hand-computed scores."""

import heapq
import random

import pytest

from nanovlm import rewards
from nanovlm.rewards import (REWARD_FUNCS, combine_rewards, levenshtein, load_reward_plugin, text_accuracy,
                             weighted_cer, weighted_edit_distance)


def w(c):
    return 2.0 if c in "0123456789¥$" else 1.0


def all_edit_scripts(ref, hyp):
    """Every alignment of hyp against ref as a list of ops, enumerated without memo (exponential, tiny inputs)."""
    if not ref and not hyp:
        yield []
        return
    if ref and hyp:
        for rest in all_edit_scripts(ref[1:], hyp[1:]):
            yield [("pair", ref[0], hyp[0])] + rest  # keep (equal) or substitute
    if ref:
        for rest in all_edit_scripts(ref[1:], hyp):
            yield [("insert", ref[0])] + rest
    if hyp:
        for rest in all_edit_scripts(ref, hyp[1:]):
            yield [("delete", hyp[0])] + rest


def script_cost(script):
    cost = 0.0
    for op in script:
        if op[0] == "pair":
            cost += 0.0 if op[1] == op[2] else max(w(op[1]), w(op[2]))
        else:
            cost += w(op[1])
    return cost


def brute_force(ref, hyp):
    return min(script_cost(s) for s in all_edit_scripts(ref, hyp))


def dijkstra(ref, hyp):
    """Cheapest sequence of single-character edits applied anywhere in the string, hyp -> ref: no alignment
    assumed. Intermediate strings use the characters of ref and hyp and are at most one longer than either."""
    alphabet = sorted(set(ref + hyp))
    cap = max(len(ref), len(hyp)) + 1
    dist, heap = {hyp: 0.0}, [(0.0, hyp)]
    while heap:
        d, s = heapq.heappop(heap)
        if s == ref:
            return d
        if d > dist[s]:
            continue
        moves = [(s[:i] + s[i + 1:], w(s[i])) for i in range(len(s))]
        moves += [(s[:i] + c + s[i + 1:], max(w(s[i]), w(c))) for i in range(len(s)) for c in alphabet if c != s[i]]
        if len(s) < cap:
            moves += [(s[:i] + c + s[i:], w(c)) for i in range(len(s) + 1) for c in alphabet]
        for t, c in moves:
            if d + c < dist.get(t, float("inf")):
                dist[t] = d + c
                heapq.heappush(heap, (d + c, t))
    raise AssertionError("unreachable")


def test_weighted_edit_distance_matches_brute_force_over_alignments():
    rng = random.Random(0)
    alphabet = "ab1¥$"
    for _ in range(150):
        ref = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        hyp = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        assert weighted_edit_distance(ref, hyp) == pytest.approx(brute_force(ref, hyp)), (ref, hyp)


def test_weighted_edit_distance_matches_dijkstra_over_edit_sequences():
    rng = random.Random(1)
    for _ in range(25):
        ref = "".join(rng.choice("a1¥") for _ in range(rng.randint(0, 3)))
        hyp = "".join(rng.choice("ab1") for _ in range(rng.randint(0, 3)))
        assert weighted_edit_distance(ref, hyp) == pytest.approx(dijkstra(ref, hyp)), (ref, hyp)


def test_weighted_edit_distance_seed_example_and_weights():
    assert weighted_edit_distance("¥476.0", "¥47.0") == 2.0  # insert the digit 6
    assert weighted_edit_distance("Total", "Tota") == 1.0  # a letter costs 1
    assert weighted_edit_distance("abc", "abc") == 0.0
    assert weighted_edit_distance("", "1a") == 3.0  # delete 1 (2) and a (1)
    assert weighted_edit_distance("5", "a") == 2.0  # substitution costs the larger weight
    assert weighted_edit_distance("5", "a", important_weight=3.0) == 3.0
    assert weighted_edit_distance("x", "y", important_chars="x", important_weight=5.0) == 5.0


def test_weights_steer_the_alignment():
    # Position-by-position mismatches: a/1, 1/a (2 each) and the extra b (1) = 5.
    # Unit-cost Levenshtein's best alignment (delete the 1, substitute b -> 1: 2 edits) weighs 2 + 2 = 4.
    # The weighted optimum keeps the 1: insert a, keep 1, delete a, delete b = 1 + 0 + 1 + 1 = 3.
    ref, hyp = "a1", "1ab"
    positional = sum(max(w(a), w(b)) for a, b in zip(ref, hyp) if a != b) + sum(w(c) for c in hyp[len(ref):])
    assert positional == 5.0
    assert levenshtein(ref, hyp) == 2
    assert weighted_edit_distance(ref, hyp) == 3.0 == brute_force(ref, hyp)
    # the seed example counted cell by cell would be 6 (".", "0" shifted, one missing), not 2
    assert weighted_edit_distance("¥476.0", "¥47.0") != 6.0


def test_weighted_cer():
    assert weighted_cer("", "") == 0.0
    assert weighted_cer("", "x") == 1.0
    assert weighted_cer("¥47", "¥47") == 0.0
    assert weighted_cer("a1", "") == 1.0  # (1 + 2) / (1 + 2)
    assert weighted_cer("a1", "a") == pytest.approx(2 / 3)
    assert weighted_cer("a1", "1") == pytest.approx(1 / 3)
    assert weighted_cer("¥476.0", "¥47.0") == pytest.approx(2 / 11)  # ref weight 2+2+2+2+1+2
    assert weighted_cer("a", "abcd") == 3.0  # above 1 when hyp is much longer


def test_levenshtein_and_text_accuracy():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("12", "21") == 2  # no extra cost for digits here
    assert text_accuracy("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert text_accuracy("", "") == 1.0
    assert text_accuracy("abc", "") == 0.0
    assert text_accuracy("KQX", "KQX") == 1.0
    assert text_accuracy("kqx", "KQX") == 0.0


def test_format_reward():
    good = [
        "<think>a</think><answer>b</answer>",
        "<think>\nline 1\nline 2\n</think>\n\n<answer>\n42\n</answer>\n",
        "  <think>x</think>   <answer>y</answer>  ",
    ]
    bad = [
        "<think>a</think><answer>b</answer> and more",
        "<answer>b</answer>",
        "<answer>b</answer><think>a</think>",
        "<think>a</think> text <answer>b</answer>",
        "preamble <think>a</think><answer>b</answer>",
        "<think>a</think><answer>b</answer> x </answer>",
        "<think>a</think><answer>b",
        "",
    ]
    assert rewards.reward_format(good, [""] * 3) == [1.0, 1.0, 1.0]
    assert rewards.reward_format(bad, [""] * len(bad)) == [0.0] * len(bad)


def test_ocr_exact_reward():
    comps = ["<think>reading</think><answer> ¥47.0 </answer>", "  ¥476.0 \n", "<answer>zzzzzzzzzzzzzzzz</answer>"]
    sols = ["¥476.0", "¥476.0", "ab"]
    assert REWARD_FUNCS["ocr"](comps, sols) == pytest.approx([1 - 2 / 11, 1.0, 0.0])  # floored at 0
    assert REWARD_FUNCS["exact"](comps, sols) == [0.0, 1.0, 0.0]
    assert REWARD_FUNCS["exact"](["<think>x <answer>no</answer></think><answer>KQX</answer>"], ["KQX "]) == [1.0]
    assert REWARD_FUNCS["exact"](["<answer>kqx</answer>"], ["KQX"]) == [0.0]
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        REWARD_FUNCS["ocr"](["a", "b"], ["a"])


def test_numeric_reward():
    f = REWARD_FUNCS["numeric"]
    assert f(["<answer>101</answer>"], ["100"]) == pytest.approx([0.99])
    assert f(["the bars are 3 and 5"], ["3, 4"]) == pytest.approx([(1 + 0.75) / 2])
    assert f(["<num><3.5> and <num><-2e1>, ignore 99"], ["3.5 -20"]) == pytest.approx([1.0])
    assert f(["-1.5e2"], ["<num><-150>"]) == pytest.approx([1.0])
    assert f([".5"], ["0.5"]) == [1.0]
    assert f(["300"], ["100"]) == [0.0]  # floored at 0
    assert f(["1 2"], ["1"]) == [0.0]  # count differs
    assert f(["no numbers"], ["7"]) == [0.0]
    assert f(["7"], ["no numbers"]) == [0.0]
    assert f(["0"], ["0"]) == [1.0]
    assert f(["0.001"], ["0"]) == [0.0]  # a zero needs an exact zero


def test_combine_rewards():
    comps = ["<think>a</think><answer>¥47.0</answer>", "¥476.0"]
    sols = ["¥476.0", "¥476.0"]
    total, per = combine_rewards(["format", "ocr"], [0.5, 2.0], comps, sols, qtype=["ocr", "ocr"])
    assert per == {"format": [1.0, 0.0], "ocr": pytest.approx([1 - 2 / 11, 1.0])}
    assert total == pytest.approx([0.5 + 2 * (1 - 2 / 11), 2.0])
    total, _ = combine_rewards(["exact"], None, comps, sols)
    assert total == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 reward names but 1 weights"):
        combine_rewards(["format", "ocr"], [1.0], comps, sols)
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        combine_rewards(["ocr"], None, comps, sols[:1])
    with pytest.raises(ValueError, match="column 'qtype' has 3 entries"):
        combine_rewards(["ocr"], None, comps, sols, qtype=["a", "b", "c"])
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        combine_rewards(["nope"], None, comps, sols)


PLUGIN_DICT = '''
def length_penalty(completions, solutions, **columns):
    return [-len(c) / 100 for c in completions]

def _helper():
    pass

REWARD_FUNCS = {"length": length_penalty}
'''

PLUGIN_PREFIX = '''
from nanovlm.rewards import reward_ocr  # imported, not defined here: not registered again

def reward_shout(completions, solutions, **columns):
    return [float(c.isupper()) for c in completions]

def reward_qtype(completions, solutions, qtype=None, **columns):
    return [float(q == "ocr") for q in qtype]

def helper(completions, solutions, **columns):
    return [0.0] * len(completions)
'''


def test_load_reward_plugin(tmp_path):
    registry = dict(REWARD_FUNCS)
    a = tmp_path / "a.py"
    a.write_text(PLUGIN_DICT)
    got = load_reward_plugin(a, registry)
    assert list(got) == ["length"] and registry["length"](["abcd"], ["x"]) == [-0.04]
    assert list(load_reward_plugin(a, registry)) == ["length"]  # reloading the same file is fine

    b = tmp_path / "rewards.py"
    b.write_text(PLUGIN_PREFIX)
    got = load_reward_plugin(b, registry)
    assert sorted(got) == ["reward_qtype", "reward_shout"]
    assert registry["reward_shout"](["ABC", "abc"], ["", ""]) == [1.0, 0.0]
    assert registry["ocr"] is rewards.reward_ocr


def test_load_reward_plugin_into_global_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "REWARD_FUNCS", dict(REWARD_FUNCS))  # leave the real registry untouched
    p = tmp_path / "mine.py"
    p.write_text(PLUGIN_PREFIX)
    load_reward_plugin(p)
    total, per = combine_rewards(["reward_qtype", "exact"], None, ["x", "y"], ["x", "x"], qtype=["ocr", "chart"])
    assert per["reward_qtype"] == [1.0, 0.0] and total == [2.0, 0.0]


def test_load_reward_plugin_errors(tmp_path):
    registry = dict(REWARD_FUNCS)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_plugin(tmp_path / "missing.py", registry)

    bad = tmp_path / "broken.py"
    bad.write_text("def reward_x(completions, solutions:\n    return []\n")
    with pytest.raises(SyntaxError, match=r"broken\.py, line 1"):
        load_reward_plugin(bad, registry)

    crash = tmp_path / "crash.py"
    crash.write_text("raise ImportError('needs a package')\n")
    with pytest.raises(RuntimeError, match=r"crash\.py failed while importing: ImportError: needs a package"):
        load_reward_plugin(crash, registry)

    empty = tmp_path / "empty.py"
    empty.write_text("def helper():\n    pass\n")
    with pytest.raises(ValueError, match=r"empty\.py: defines no REWARD_FUNCS"):
        load_reward_plugin(empty, registry)

    clash = tmp_path / "clash.py"
    clash.write_text("def mine(c, s, **k):\n    return [0.0] * len(c)\nREWARD_FUNCS = {'ocr': mine}\n")
    with pytest.raises(ValueError, match=r"clash\.py: reward 'ocr' is already registered by nanovlm.rewards"):
        load_reward_plugin(clash, registry)
    assert registry["ocr"] is rewards.reward_ocr  # nothing half-registered

    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text(PLUGIN_DICT)
    two.write_text(PLUGIN_DICT)
    load_reward_plugin(one, registry)
    with pytest.raises(ValueError, match=r"two\.py: reward 'length' is already registered by .*one\.py"):
        load_reward_plugin(two, registry)

    notdict = tmp_path / "notdict.py"
    notdict.write_text("REWARD_FUNCS = ['x']\n")
    with pytest.raises(TypeError, match="must be a dict"):
        load_reward_plugin(notdict, registry)
