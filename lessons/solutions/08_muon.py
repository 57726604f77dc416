"""Answers to the exercises of lesson 8 (Muon). Each `wrong_*` is a plausible mistake its checker catches."""

import torch

A, B, C = 3.4445, -4.7750, 2.0315


def spectral_descent_step(G, eta):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return -eta * U @ Vh                                   # against the gradient, every singular value eta


def wrong_spectral_descent_step(G, eta):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return eta * U @ Vh                                    # the sign of "equality when dW = eta U V^T": ascent


def newton_schulz(G, steps):
    X = G / (G.norm() + 1e-7)                              # every singular value <= 1
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T                                            # iterate on the wide side: X X^T is the small square
    for _ in range(steps):
        M = X @ X.T
        X = A * X + (B * M + C * M @ M) @ X
    return X.T if tall else X


def wrong_newton_schulz(G, steps):
    X = G                                                  # not normalised: singular values > 1 blow up
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        M = X @ X.T
        X = A * X + (B * M + C * M @ M) @ X
    return X.T if tall else X


def muon_direction(grad, buf, mu):
    buf = mu * buf + (1 - mu) * grad                        # momentum buffer
    return (1 - mu) * grad + mu * buf, buf                 # Nesterov look-ahead: grad.lerp(buf, mu)


def wrong_muon_direction(grad, buf, mu):
    buf = mu * buf + (1 - mu) * grad
    return buf, buf                                        # plain momentum: not what muon.py orthogonalises
