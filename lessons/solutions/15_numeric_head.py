"""Answers to the exercises of lesson 15 (the numeric head). Each `wrong_*` is a plausible mistake its checker catches."""

import torch


def symlog_slope(x):
    return 1.0 / (1.0 + x.abs())                          # d/dx sign(x) log(1 + |x|)


def wrong_symlog_slope(x):
    return 1.0 / x.abs().clamp(min=1.0)                   # "relative error for values above 1": wrong near 1


def head_positions(ids, labels, num_id):
    trained = (ids == num_id) & (labels != -100)          # (B, T)
    return trained[:, 1:]                                 # position t is read when token t + 1 is a trained <num>


def wrong_head_positions(ids, labels, num_id):
    trained = (ids == num_id) & (labels != -100)
    return trained[:, :-1]                                # the <num> positions themselves: the head would copy
