"""The network path of :class:`heads.NBRegressor` (``solver="adam"``): a linear or
one-hidden-layer network with NB outputs per gene, trained by Adam with L2 weight decay
and early stopping on held-out groups (STimage's recipe, on cached vectors).

Outputs per gene: ``eta`` (log mean at the reference depth) for the mean/dispersion
parametrisation, with one learned ``log_theta`` per gene; or STimage's ``(a, b)`` with
``r = softplus(a)`` and ``p = sigmoid(b)`` in scipy's ``nbinom(r, p)`` convention
(:mod:`heads.distributions`). The library offset ``log(library_size / ref)`` (counts)
enters as ``eta + offset`` or ``b - offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads.distributions import nb_log_prob_log_mu, nb_log_prob_stimage

#: added to softplus(a) in the STimage parametrisation so r > 0 in float32
R_FLOOR = 1e-8


class NBNet(nn.Module):
    """Linear or one-hidden-layer network with outputs ``n_out_per_gene * n_genes``."""

    def __init__(self, n_features: int, n_genes: int, hidden: int, dropout: float, parametrisation: str):
        super().__init__()
        self.dropout = float(dropout)
        self.n_genes = n_genes
        self.parametrisation = parametrisation
        self.hidden = nn.Linear(n_features, hidden) if hidden > 0 else None
        per_gene = 1 if parametrisation == "mean_dispersion" else 2
        self.out = nn.Linear(hidden if hidden > 0 else n_features, per_gene * n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if parametrisation == "mean_dispersion" else None

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        if self.training and self.dropout > 0:
            keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= self.dropout
            x = x * keep / (1.0 - self.dropout)
        return self.out(x)

    def log_prob(self, out: torch.Tensor, y: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """NB log-pmf of RAW counts ``y`` (n, g) given the network output ``out`` and the
        per-spot log library offset ``offset`` (n,)."""
        g = self.n_genes
        if self.parametrisation == "mean_dispersion":
            return nb_log_prob_log_mu(y, out + offset[:, None], self.log_theta[None, :])
        r = F.softplus(out[:, :g]) + R_FLOOR
        return nb_log_prob_stimage(y, r, out[:, g:] - offset[:, None])

    def initialise(self, y_norm: np.ndarray, gen: torch.Generator) -> None:
        """Deterministic init: PyTorch's default uniform(+-1/sqrt(fan_in)) for the hidden
        layer, 0.1 x that for the output weights, output biases at the per-gene log mean of
        library-normalised counts ``y_norm`` (counts at the reference depth), dispersions at
        a clipped method-of-moments estimate."""
        with torch.no_grad():
            layers = [self.hidden] if self.hidden is not None else []
            for layer in layers + [self.out]:
                bound = 1.0 / np.sqrt(layer.in_features)
                scale = 0.1 if layer is self.out else 1.0
                layer.weight.uniform_(-bound * scale, bound * scale, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
            m = np.maximum(y_norm.mean(axis=0), 1e-6)
            v = y_norm.var(axis=0)
            theta0 = np.clip(m**2 / np.maximum(v - m, 1e-12), 1e-2, 1e3)
            g = self.n_genes
            if self.parametrisation == "mean_dispersion":
                self.out.bias.copy_(torch.as_tensor(np.log(m), dtype=torch.float32))
                self.log_theta.copy_(torch.as_tensor(np.log(theta0), dtype=torch.float32))
            else:
                a0 = theta0 + np.log(-np.expm1(-theta0))  # softplus^-1(theta0)
                self.out.bias[:g] = torch.as_tensor(a0, dtype=torch.float32)
                self.out.bias[g:] = torch.as_tensor(np.log(theta0) - np.log(m), dtype=torch.float32)

    def nb_at_ref(self, Xs: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """``(log_mu_ref, theta)`` (n, g) float64 at the reference depth for standardised
        features ``Xs`` (float32), predicted in chunks of ``chunk`` rows."""
        device = next(self.parameters()).device
        g = self.n_genes
        self.eval()
        outs = []
        with torch.no_grad():
            for start in range(0, Xs.shape[0], chunk):
                outs.append(self(torch.as_tensor(Xs[start : start + chunk], device=device)).cpu().numpy())
        out = np.concatenate(outs, axis=0).astype(np.float64) if outs else np.zeros((0, self.out.out_features))
        if self.parametrisation == "mean_dispersion":
            theta = np.exp(self.log_theta.detach().cpu().numpy().astype(np.float64))
            return out, np.broadcast_to(theta, out.shape).copy()
        r = np.logaddexp(0.0, out[:, :g]) + R_FLOOR
        return np.log(r) - out[:, g:], r


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    best_epoch: int


@dataclass(frozen=True)
class AdamSchedule:
    """Optimiser settings: learning rate, L2 weight decay on the weights (not biases or
    dispersions), batch size (``None``: full batch), epochs and early-stopping patience."""

    lr: float
    weight_decay: float
    batch_size: int | None
    max_epochs: int
    patience: int


def train_network(
    module: NBNet,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    off: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    schedule: AdamSchedule,
    cpu_gen: torch.Generator,
    dev_gen: torch.Generator,
) -> TrainResult:
    """Adam on the mean NB NLL per (spot, gene) of the ``train_idx`` rows, early stopping on
    the ``val_idx`` rows' NLL (the best epoch's weights are restored)."""
    device = Xt.device
    tr = torch.as_tensor(train_idx, device=device)
    va = torch.as_tensor(val_idx, device=device)
    decay = [p for name, p in module.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in module.named_parameters() if not name.endswith("weight")]
    opt = torch.optim.Adam(
        [{"params": decay, "weight_decay": float(schedule.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(schedule.lr),
    )
    n_train = len(train_idx)
    bs = n_train if schedule.batch_size is None else min(int(schedule.batch_size), n_train)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best_val, best_epoch, best_state = np.inf, 0, None
    for epoch in range(int(schedule.max_epochs)):
        module.train()
        order = tr if bs == n_train else tr[torch.randperm(n_train, generator=cpu_gen).to(device)]
        total = 0.0
        for start in range(0, n_train, bs):
            rows = order[start : start + bs]
            opt.zero_grad(set_to_none=True)
            loss = -module.log_prob(module(Xt[rows], dev_gen), yt[rows], off[rows]).mean()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        history["train"].append(total / n_train)
        if len(val_idx) == 0:
            best_epoch = epoch
            continue
        module.eval()
        with torch.no_grad():
            val = float(-module.log_prob(module(Xt[va]), yt[va], off[va]).mean())
        history["val"].append(val)
        if val < best_val:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif epoch - best_epoch >= int(schedule.patience):
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return TrainResult(history, int(best_epoch))
