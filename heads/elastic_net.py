"""Elastic-net logistic regression for many binary targets at once (one per gene), the
objective of ``sklearn.linear_model.LogisticRegression(C, l1_ratio)``:

    min_{w, b}  (1 - l1_ratio) / 2 ||w||^2 + l1_ratio ||w||_1 + C sum_i log(1 + exp(-s_i (x_i w + b)))

with ``s_i = +-1`` and an unpenalised intercept ``b``. All genes share ``X``, so one
batched accelerated proximal-gradient solver (FISTA with a per-gene adaptive restart,
O'Donoghue & Candes 2015) updates the (dim, n_genes) coefficient matrix with two matrix
products per iteration, instead of one ``saga`` fit per gene. Tested against scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ElasticNetFit:
    """``coef`` (n_genes, dim), ``intercept`` (n_genes,), ``n_iter`` (n_genes,) iterations
    until the gene met the tolerance, ``converged`` (n_genes,) bool."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray


def _spectral_norm_sq(X: torch.Tensor, steps: int = 50) -> float:
    """Largest eigenvalue of ``X^T X`` by power iteration (seeded, deterministic)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(X.shape[1], 1, generator=gen, dtype=X.dtype).to(X.device)
    lam = 0.0
    for _ in range(steps):
        u = X.T @ (X @ v)
        lam = float(torch.linalg.vector_norm(u))
        v = u / max(lam, 1e-30)
    return lam


def fit_elastic_net_logistic(
    X: np.ndarray,
    Y: np.ndarray,
    C: float,
    l1_ratio: float,
    max_iter: int = 2000,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> ElasticNetFit:
    """Fit every column of the binary ``Y`` (n, n_genes) on ``X`` (n, dim) (see the module
    doc). A gene stops when its proximal-gradient step moves no coefficient by more than
    ``tol`` x (1 + its largest coefficient), sklearn's saga criterion on the change of the
    weights; at most ``max_iter`` iterations."""
    if C <= 0 or not 0.0 <= l1_ratio <= 1.0:
        raise ValueError(f"C must be > 0 and l1_ratio in [0, 1], got C={C}, l1_ratio={l1_ratio}")
    kw = {"device": torch.device(device), "dtype": dtype}
    Xt = torch.as_tensor(np.asarray(X), **kw)
    Yt = torch.as_tensor(np.asarray(Y, dtype=np.float64), **kw)
    n, d = Xt.shape
    G = Yt.shape[1]
    lam2, lam1 = (1.0 - l1_ratio) / (C * n), l1_ratio / (C * n)
    # Lipschitz constant of the smooth part's gradient in (w, b): the logistic curvature is
    # at most 1/4, the design [X, 1] has squared spectral norm <= ||X||^2 + n
    step = 1.0 / ((_spectral_norm_sq(Xt) + n) / (4.0 * n) + lam2)
    coef = torch.zeros((d, G), **kw)  # results, written as each gene stops
    intercept = torch.zeros(G, **kw)
    n_iter = torch.full((G,), int(max_iter), dtype=torch.int64)
    converged = torch.zeros(G, dtype=torch.bool)
    # the state of the genes still running only: a finished gene's column leaves every matrix
    # product, so an iteration costs in proportion to the genes left
    idx = torch.arange(G, device=kw["device"])
    Ya = Yt
    W = torch.zeros((d, G), **kw)
    p = Yt.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(p / (1 - p))
    Wy, by = W.clone(), b.clone()
    t = torch.ones(G, **kw)
    for it in range(1, int(max_iter) + 1):
        r = torch.sigmoid(Xt @ Wy + by) - Ya  # (n, genes left)
        gW = Xt.T @ r / n + lam2 * Wy
        gb = r.mean(dim=0)
        Wn = Wy - step * gW
        Wn = torch.sign(Wn) * torch.clamp(Wn.abs() - step * lam1, min=0.0)
        bn = by - step * gb
        delta = (Wn - W).abs().amax(dim=0)
        done = delta <= tol * (1.0 + Wn.abs().amax(dim=0))
        t_next = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_next
        # adaptive restart: drop the momentum of a gene whose step went against it
        restart = ((Wy - Wn) * (Wn - W)).sum(dim=0) + (by - bn) * (bn - b) > 0
        beta = torch.where(restart, torch.zeros_like(beta), beta)
        t_next = torch.where(restart, torch.ones_like(t_next), t_next)
        Wy = Wn + beta * (Wn - W)
        by = bn + beta * (bn - b)
        W, b, t = Wn, bn, t_next
        if bool(done.any()):
            fin = idx[done]
            coef[:, fin], intercept[fin] = W[:, done], b[done]
            n_iter[fin.cpu()] = it
            converged[fin.cpu()] = True
            keep = ~done
            if not bool(keep.any()):
                break
            idx, Ya, W, b, Wy, by, t = idx[keep], Ya[:, keep], W[:, keep], b[keep], Wy[:, keep], by[keep], t[keep]
    else:
        coef[:, idx], intercept[idx] = W, b  # genes still running at max_iter
    return ElasticNetFit(
        coef=coef.T.cpu().double().numpy().copy(),
        intercept=intercept.cpu().double().numpy().copy(),
        n_iter=n_iter.numpy(),
        converged=converged.numpy(),
    )
