"""Answers to lesson 12 (weighted edit distance). Each `wrong_*` is a plausible mistake its checker catches."""

from nanovlm.rewards import IMPORTANT_CHARS


def edit_distance(ref, hyp, w):
    prev = [0.0]
    for b in hyp:
        prev.append(prev[-1] + w(b))                      # row 0: delete everything
    for a in ref:
        row = [prev[0] + w(a)]                            # column 0: insert everything
        for j, b in enumerate(hyp, start=1):
            row.append(min(prev[j - 1] + (0.0 if a == b else max(w(a), w(b))), prev[j] + w(a), row[j - 1] + w(b)))
        prev = row
    return prev[-1]


def wrong_edit_distance(ref, hyp, w):
    prev = [0.0]
    for b in hyp:
        prev.append(prev[-1] + w(b))
    for a in ref:
        row = [prev[0] + w(a)]
        for j, b in enumerate(hyp, start=1):              # substitution charged w(a) + w(b): never cheaper than del + ins
            row.append(min(prev[j - 1] + (0.0 if a == b else w(a) + w(b)), prev[j] + w(a), row[j - 1] + w(b)))
        prev = row
    return prev[-1]


def _w(c):
    return 2.0 if c in IMPORTANT_CHARS else 1.0


def _table(ref, hyp):
    D = [[0.0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for j in range(1, len(hyp) + 1):
        D[0][j] = D[0][j - 1] + _w(hyp[j - 1])
    for i in range(1, len(ref) + 1):
        D[i][0] = D[i - 1][0] + _w(ref[i - 1])
        for j in range(1, len(hyp) + 1):
            a, b = ref[i - 1], hyp[j - 1]
            D[i][j] = min(D[i - 1][j - 1] + (0.0 if a == b else max(_w(a), _w(b))), D[i - 1][j] + _w(a), D[i][j - 1] + _w(b))
    return D


def edit_script(ref, hyp):
    D = _table(ref, hyp)
    i, j, ops = len(ref), len(hyp), []
    while i or j:                                          # walk back along a cheapest path
        if i and j:
            a, b = ref[i - 1], hyp[j - 1]
            diag = D[i - 1][j - 1] + (0.0 if a == b else max(_w(a), _w(b)))
            if abs(D[i][j] - diag) < 1e-9:
                ops.append(("keep", a) if a == b else ("sub", b, a))
                i, j = i - 1, j - 1
                continue
        if i and abs(D[i][j] - (D[i - 1][j] + _w(ref[i - 1]))) < 1e-9:
            ops.append(("ins", ref[i - 1]))
            i -= 1
        else:
            ops.append(("del", hyp[j - 1]))
            j -= 1
    return ops[::-1]


def wrong_edit_script(ref, hyp):
    ops = []                                               # position by position: one missing char shifts the rest
    for a, b in zip(ref, hyp):
        ops.append(("keep", a) if a == b else ("sub", b, a))
    ops += [("ins", c) for c in ref[len(hyp):]] + [("del", c) for c in hyp[len(ref):]]
    return ops
