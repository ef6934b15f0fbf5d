"""Learned attention over a spot's lattice neighbours, with a relative-position encoding,
and an NB output (torch; arrays in, arrays out). Used by
:class:`heads.context.ContextNBRegressor` with ``aggregation="attention"``.

Model, per spot ``i`` with principal-component scores ``z_i`` (of the standardised
vectors) and neighbours ``j`` (all rings; masked slots excluded; the spot itself is a
token with offset 0)::

    logit_ij = (Wq z_i) . (Wk z_j) / sqrt(h) + pos(d_ij)    d_ij = offset in pitches
    a_ij     = softmax_j(logit_ij)                          (over the spot and its neighbours)
    c_i      = sum_j a_ij z_j
    log mu_ig = z_i @ A_g + c_i @ C_g + b_g + log(library_size_i / ref)
    Y_ig ~ NB(mu_ig, theta_g)

``pos`` is a small MLP of the Fourier features of the offset (dx, dy in pitches) and its
length, so attention can weight near and far, and direction, differently.

Used as such (``readout="net"``), or (``readout="glm"``, the default of the head) only for
its attention: the attention-weighted mean of the neighbours' vectors
(:meth:`AttentionNB.attention_pool`) then joins the spot's own vector in the NB GLM of
:class:`heads.nb.NBRegressor` (L2 by grouped CV), which fits the readout better than Adam
on a few hundred training spots.

Measured (``benchmarks/bench_context.py``, Lite0, var:50, leave-one-slide-out): with the
GLM readout about as good as the fixed mean on HER2ST (0.311 vs 0.303) but unstable on
MOB (0.171 on MOB2, where the mean gave 0.322: the query-key similarity of a new slide's
vectors drifts), at ~10x the fit time; hence not the head's default.

Training: full-batch Adam on the mean NB NLL per (spot, gene) with weight decay on the
weight matrices; the weight decay is chosen from ``weight_decays`` by CV grouped by slide
(each fold early-stops on its held-out slides; the decay with the lowest held-out NLL at
its best epoch wins); the final model is refitted on all rows for the median best epoch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from heads.device import resolve_device
from heads.distributions import nb_log_prob_log_mu
from heads.inputs import check_counts, check_library_size
from heads.nb_glm import initial_nb_params
from heads.validation_split import grouped_cv_splits

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)
_N_FREQ = 4  # Fourier frequencies of the position encoding


def stack_rings(nbs: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of each spot: itself then every ring's neighbours. Returns ``index`` (n, T)
    int64, ``mask`` (n, T) bool and ``offset`` (n, T, 2) float32 (pitches); ``nbs`` entries
    ``None`` (no coordinates) contribute no token."""
    own = np.arange(n, dtype=np.int64)[:, None]
    idx, mask, off = [own], [np.ones((n, 1), bool)], [np.zeros((n, 1, 2))]
    for nb in nbs:
        if nb is not None:
            idx.append(nb.index)
            mask.append(nb.mask)
            off.append(nb.offset)
    return np.concatenate(idx, 1), np.concatenate(mask, 1), np.concatenate(off, 1).astype(np.float32)


class _AttentionNet(nn.Module):
    def __init__(self, r: int, n_genes: int, hidden: int):
        super().__init__()
        self.q = nn.Linear(r, hidden, bias=False)
        self.k = nn.Linear(r, hidden, bias=False)
        self.pos = nn.Sequential(nn.Linear(4 * _N_FREQ + 1, 16), nn.Tanh(), nn.Linear(16, 1))
        self.own = nn.Linear(r, n_genes)
        self.ctx = nn.Linear(r, n_genes, bias=False)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        self.scale = float(hidden) ** -0.5

    @staticmethod
    def encode(offset: torch.Tensor) -> torch.Tensor:
        """Fourier features of offsets (..., 2) in pitches, and their length: (..., 4F+1)."""
        freqs = torch.pi * 2.0 ** torch.arange(_N_FREQ, dtype=offset.dtype, device=offset.device) / 4.0
        ang = offset[..., None] * freqs  # (..., 2, F)
        feats = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)
        return torch.cat([feats, offset.norm(dim=-1, keepdim=True)], dim=-1)

    def forward(
        self, Z: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, pos_feat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``eta`` (len(rows), G) without the library offset, and the attention weights."""
        zi = Z[rows]
        zj = Z[index[rows]]  # (b, T, r)
        logit = torch.einsum("bh,bth->bt", self.q(zi), self.k(zj)) * self.scale + self.pos(pos_feat[rows]).squeeze(-1)
        logit = logit.masked_fill(~mask[rows], float("-inf"))
        att = torch.softmax(logit, dim=1)
        c = torch.einsum("bt,btr->br", att, zj)
        return self.own(zi) + self.ctx(c), att


class AttentionNB:
    """The attention model's arrays-in/arrays-out fit and prediction (see the module doc).
    Not an sklearn estimator on its own: :class:`heads.context.ContextNBRegressor` holds
    its parameters."""

    def __init__(
        self,
        weight_decays=None,
        hidden=64,
        lr=3e-3,
        n_components=256,
        cv=5,
        max_epochs=300,
        patience=20,
        random_state=0,
        device="auto",
    ):
        self.weight_decays = DEFAULT_WEIGHT_DECAYS if weight_decays is None else tuple(weight_decays)
        self.hidden, self.lr, self.n_components, self.cv = int(hidden), float(lr), n_components, int(cv)
        self.max_epochs, self.patience = int(max_epochs), int(patience)
        self.seed = 0 if random_state is None else int(random_state)
        self.device = resolve_device(device)

    # ------------------------------------------------------------------ features
    def _scores(self, X: np.ndarray) -> np.ndarray:
        return ((X.astype(np.float64) - self.mean_) / self.scale_) @ self.V_

    def _tensors(self, X: np.ndarray, nbs: list) -> tuple:
        index, mask, offset = stack_rings(nbs, X.shape[0])

        def t(a, dt=torch.float32):
            return torch.as_tensor(a, dtype=dt, device=self.device)

        return (t(self._scores(X)), t(index, torch.int64), t(mask, torch.bool), _AttentionNet.encode(t(offset)))

    # ------------------------------------------------------------------ training
    def _train(self, data: tuple, Y, off, tr: np.ndarray, va: np.ndarray | None, wd: float, epochs: int):
        """Adam on rows ``tr``; with ``va``: early stopping, returns (best NLL, best epoch);
        else trains ``epochs`` epochs and returns the module."""
        torch.manual_seed(self.seed)
        net = _AttentionNet(data[0].shape[1], Y.shape[1], self.hidden).to(self.device)
        with torch.no_grad():
            net.own.weight.mul_(0.1)
            net.ctx.weight.zero_()
            net.own.bias.copy_(torch.as_tensor(self.b0_, dtype=torch.float32))
            net.log_theta.copy_(torch.as_tensor(self.lt0_, dtype=torch.float32))
        decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=self.lr
        )
        trt = torch.as_tensor(tr, device=self.device)
        vat = None if va is None else torch.as_tensor(va, device=self.device)
        best, best_epoch = np.inf, 0
        for epoch in range(epochs):
            net.train()
            opt.zero_grad(set_to_none=True)
            eta, _ = net(data[0], trt, data[1], data[2], data[3])
            loss = -nb_log_prob_log_mu(Y[trt], eta + off[trt, None], net.log_theta[None]).mean()
            loss.backward()
            opt.step()
            if vat is None:
                continue
            net.eval()
            with torch.no_grad():
                eta, _ = net(data[0], vat, data[1], data[2], data[3])
                val = float(-nb_log_prob_log_mu(Y[vat], eta + off[vat, None], net.log_theta[None]).mean())
            if val < best - 1e-6:
                best, best_epoch = val, epoch + 1
            elif epoch + 1 - best_epoch >= self.patience:
                break
        return (best, best_epoch) if vat is not None else net

    def fit(self, X: np.ndarray, nbs: list, y: np.ndarray, groups=None, library_size=None) -> AttentionNB:
        n = X.shape[0]
        y = check_counts(y, n)
        lib = check_library_size(library_size, y, n)
        self.mean_, self.scale_ = X.mean(0).astype(np.float64), np.maximum(X.std(0).astype(np.float64), 1e-8)
        Xs = (X.astype(np.float64) - self.mean_) / self.scale_
        _, s, vt = np.linalg.svd(Xs, full_matrices=False)
        r = min(int(self.n_components or vt.shape[0]), int(np.sum(s > s[0] * 1e-6)))
        self.V_ = vt[:r].T / (s[0] / np.sqrt(n))  # scores scaled so the leading PC has unit variance
        self.n_genes_, self.ref_library_size_ = y.shape[1], float(np.median(lib))
        offset = np.log(lib / self.ref_library_size_)
        self.b0_, self.lt0_ = initial_nb_params(y, offset)
        data = self._tensors(X, nbs)
        Y = torch.as_tensor(y, dtype=torch.float32, device=self.device)
        off = torch.as_tensor(offset, dtype=torch.float32, device=self.device)
        folds = grouped_cv_splits(n, groups, self.cv, self.seed)
        losses, epochs = np.zeros(len(self.weight_decays)), np.zeros((len(self.weight_decays), len(folds)), int)
        for a, wd in enumerate(self.weight_decays):
            for f, (tr, va) in enumerate(folds):
                loss, epochs[a, f] = self._train(data, Y, off, tr, va, wd, self.max_epochs)
                losses[a] += loss / len(folds)
        best = int(np.argmin(losses))
        self.cv_loss_, self.weight_decay_ = losses, float(self.weight_decays[best])
        self.n_epochs_ = max(1, int(np.median(epochs[best])))
        self.net_ = self._train(data, Y, off, np.arange(n), None, self.weight_decay_, self.n_epochs_)
        self.net_.eval()
        logger.debug(
            "attention NB: weight decay %.3g (held-out NLL %s), %d epochs",
            self.weight_decay_,
            np.round(losses, 4),
            self.n_epochs_,
        )
        return self

    # ------------------------------------------------------------------ prediction
    def attention_pool(self, X: np.ndarray, nbs: list) -> np.ndarray:
        """The learned attention's weighted mean of each spot's neighbours' rows of ``X``
        (n, dim), renormalised over the real neighbours (the spot's own token left out);
        a spot without neighbours gets its own row."""
        data = self._tensors(X, nbs)
        with torch.no_grad():
            _, att = self.net_(data[0], torch.arange(X.shape[0], device=self.device), data[1], data[2], data[3])
        w = att[:, 1:].cpu().double().numpy() * data[2][:, 1:].cpu().numpy()
        idx = data[1][:, 1:].cpu().numpy()
        tot = w.sum(axis=1, keepdims=True)
        pooled = np.einsum("nt,ntd->nd", w / np.maximum(tot, 1e-12), X[idx].astype(np.float64))
        return np.where(tot > 0, pooled, X).astype(np.float32)

    def nb_at_ref(self, X: np.ndarray, nbs: list) -> tuple[np.ndarray, np.ndarray]:
        """``(log_mu_ref, theta)`` (n, G) float64 at the reference library size."""
        data = self._tensors(X, nbs)
        rows = torch.arange(X.shape[0], device=self.device)
        with torch.no_grad():
            eta, _ = self.net_(data[0], rows, data[1], data[2], data[3])
            theta = torch.exp(self.net_.log_theta)
        eta = eta.cpu().double().numpy()
        return eta, np.broadcast_to(theta.cpu().double().numpy(), eta.shape).copy()


__all__ = ["DEFAULT_WEIGHT_DECAYS", "AttentionNB", "stack_rings"]
