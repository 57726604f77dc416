"""Answers to the exercises of lesson 5 (tokenizer). Each `wrong_*` is a plausible mistake its checker catches."""


def _byte_table():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)                      # the 68 others, in increasing byte order
            n += 1
    return table


def byte_symbols(text):
    table = _byte_table()
    return [table[b] for b in text.encode("utf-8")]


def wrong_byte_symbols(text):
    table = _byte_table()
    return [table.get(ord(c), c) for c in text]          # characters, not bytes: breaks on anything beyond ASCII


def apply_merges(piece, merges):
    rank = {tuple(pair): i for i, pair in enumerate(merges)}
    symbols = list(piece)
    while len(symbols) > 1:
        ranks = [rank.get((a, b), float("inf")) for a, b in zip(symbols, symbols[1:])]
        i = min(range(len(ranks)), key=ranks.__getitem__)
        if ranks[i] == float("inf"):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def wrong_apply_merges(piece, merges):
    symbols = list(piece)
    for a, b in merges:                                  # each merge applied once, at its first occurrence only
        for i in range(len(symbols) - 1):
            if (symbols[i], symbols[i + 1]) == (a, b):
                symbols[i:i + 2] = [a + b]
                break
    return symbols


def assistant_labels(ids, offsets, spans, no_train):
    return [i if i not in no_train and any(a <= s < b for a, b in spans) else -100
            for i, (s, _) in zip(ids, offsets)]


def wrong_assistant_labels(ids, offsets, spans, no_train):
    return [i if i not in no_train and any(a <= s < b - len("<|im_end|>") for a, b in spans) else -100
            for i, (s, _) in zip(ids, offsets)]          # drops <|im_end|>: the model never learns to stop
