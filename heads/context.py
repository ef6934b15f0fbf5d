"""Spatial-context NB head: a spot's own vector plus its lattice neighbours' vectors.

What it predicts (and from what)
--------------------------------
As :class:`heads.nb.NBRegressor`: per spot and gene an NB over RAW counts whose mean at the
reference depth gives the predicted *rate* (expected fraction of the spot's counts).
The prediction for a spot is a function of image vectors only: its own and those of the
spots around it in the SAME slide (``groups``), found on the platform's lattice from the
spot centres ``coords`` (µm; :func:`heads.neighbours.find_neighbours`: up to 8 spots
within 1.5 pitches — the 6 hexagonal neighbours on Visium, 4 + 4 diagonal ones on legacy
ST — and, with the default ``rings``, a second ring up to 2.5 pitches). Nothing measured
on a predicted spot, nor on its neighbours (counts, library sizes), enters it. At a
slide's edge, or next to spots removed by QC, fewer neighbours exist: the missing slots
are masked. Without ``coords`` there are no neighbours (each ring's summary is the spot's
own vector), so the head degrades to a per-spot model.

Aggregations (``aggregation``)
------------------------------
* ``"mean"`` (default): fixed aggregation. The features are ``[x_i, mean of ring 1,
  mean of ring 2, ...]`` (masked means of the neighbours' vectors per ring), given to an
  :class:`~heads.nb.NBRegressor` GLM (standardised, ``n_components`` principal components,
  L2 chosen by CV grouped by slide over ``alphas``). Cheap: about 1.5x an ``nb`` fit.
* ``"attention"``: learned attention over the neighbours with a relative-position
  encoding (:mod:`heads.context_attention`; Adam, early stopping on held-out training
  slides, weight decay by grouped CV) pools the neighbours' vectors; the pooled vector
  joins the spot's own in the same NB GLM (``readout="glm"``; ``"net"``: the network's
  own readout, worse). About 10x the cost of ``"mean"``; not persistable by
  :func:`heads.save_head` (use it in ``compare``).

``X`` may also be the spot vector concatenated with the vector of a wider window around
the spot (``embed --context-um 300``: table ``embeddings_<backbone>__ctx300um``).

Measured (``benchmarks/bench_context.py``; leave-one-slide-out, Lite0, var:50 from the
training slides, mean PCC of log1p(CP10k) over genes averaged over folds; paired
difference to nb over (fold, gene) with a bootstrap 95 % CI)::

    design                      HER2ST (5 folds)                   MOB (4 folds)
    nb (per spot)               0.278                              0.342
    mean                        0.303 (1.09x) +0.026 [.013,.037]   0.390 (1.14x) +0.048 [.037,.059]
    attention                   0.311 (1.12x) +0.033 [.023,.044]   0.341 (1.00x) tie
    nb on [spot, 300 µm]        0.308 (1.11x)                      0.429 (1.25x)
    mean on [spot, 300 µm]      0.335 (1.21x) +0.057 [.041,.072]   0.453 (1.33x) +0.111 [.100,.123]
    nb on [spot, 300, 600 µm]   0.333 (1.20x)                      --
    mean on [spot, 300, 600 µm] 0.354 (1.27x) +0.076 [.058,.092]   --

Shuffled-vector control (vectors permuted within each slide): nb 0.002 / -0.004,
``mean`` 0.003 / 0.026, ``mean`` on [spot, 300 µm] 0.010 / 0.000 (HER2ST / MOB).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from heads.context_attention import AttentionNB
from heads.distributions import NegativeBinomial
from heads.inputs import check_groups, check_X
from heads.nb import NBRegressor
from heads.neighbours import find_neighbours, masked_neighbour_mean
from heads.outputs import NBOutputs

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "attention")
READOUTS = ("glm", "net")
#: rings of neighbours as (inner, outer radius in pitches, max spots): the lattice
#: neighbours (6 Visium / 8 legacy ST), then the next ring of legacy ST (12 spots)
DEFAULT_RINGS = ((0.0, 1.5, 8), (1.5, 2.5, 16))
#: L2 path of the mean aggregation: nb's, extended (the context features pick more L2)
CONTEXT_ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def _check_coords(coords: np.ndarray | None, n: int) -> np.ndarray | None:
    if coords is None:
        return None
    c = np.asarray(coords, dtype=np.float64)
    if c.shape != (n, 2):
        raise ValueError(f"coords: expected ({n}, 2) spot centres in µm, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("coords: spot centres must be finite")
    return c


class ContextNBRegressor(NBOutputs, BaseEstimator):
    """NB regression on a spot's vector and its same-slide lattice neighbours' vectors
    (see the module doc).

    Parameters
    ----------
    aggregation : ``"mean"`` (fixed masked means per ring, GLM) or ``"attention"``.
    rings : ``((inner, outer, k), ...)`` neighbour rings in units of each slide's pitch
        (median nearest-neighbour distance) with at most ``k`` spots each.
    alpha, alphas, cv, n_components, max_iter : ``"mean"``: as :class:`NBRegressor`
        (``alphas`` default :data:`CONTEXT_ALPHAS`).
    weight_decays, hidden, lr, max_epochs, patience : ``"attention"``: see
        :class:`heads.context_attention.AttentionNB`.
    attention_components : ``"attention"`` with the GLM readout: principal components the
        attention network sees (it only learns the weights; the GLM reads out
        ``n_components``).
    readout : ``"attention"``: ``"glm"`` (the attention-pooled neighbour vector joins the
        spot's own in the NB GLM, L2 by grouped CV) or ``"net"`` (the attention network's
        own linear readout).
    random_state : seed (int). device : ``"auto"``, ``"cpu"``, ``"cuda"``.

    Learned attributes: ``model_`` (the fitted inner :class:`NBRegressor` or
    :class:`AttentionNB`), ``n_features_in_``, ``n_genes_``, ``ref_library_size_``,
    ``alpha_`` (the GLM's L2), ``weight_decay_`` and ``attention_`` (``"attention"``), ``neighbour_counts_``
    (histogram of real ring-1 neighbours per training spot).

    Outputs: as every NB head (:class:`heads.outputs.NBOutputs`), each prediction method
    taking the spots' ``groups`` (slides) and ``coords`` (µm) keyword-only; a spot's
    prediction depends on the other spots passed with it (its neighbours), so callers
    pass whole slides (:attr:`spatial_context`).
    """

    #: predictions read the neighbours among the spots passed together: predict whole slides
    spatial_context = True

    def __init__(
        self,
        aggregation: str = "mean",
        rings: tuple[tuple[float, float, int], ...] = DEFAULT_RINGS,
        alpha: float | None = None,
        alphas: tuple[float, ...] | None = None,
        cv: int = 5,
        n_components: int | None = 256,
        max_iter: int = 200,
        weight_decays: tuple[float, ...] | None = None,
        hidden: int = 64,
        attention_components: int = 256,
        lr: float = 3e-3,
        max_epochs: int = 300,
        patience: int = 20,
        readout: str = "glm",
        random_state: int | None = 0,
        device: str = "auto",
    ):
        self.aggregation = aggregation
        self.rings = rings
        self.alpha = alpha
        self.alphas = alphas
        self.cv = cv
        self.n_components = n_components
        self.max_iter = max_iter
        self.weight_decays = weight_decays
        self.hidden = hidden
        self.attention_components = attention_components
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.readout = readout
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> list[tuple[float, float, int]]:
        if self.readout not in READOUTS:
            raise ValueError(f"readout: expected one of {READOUTS}, got {self.readout!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        rings = [(float(a), float(b), int(k)) for a, b, k in self.rings]
        if not rings:
            raise ValueError("rings: need at least one ring of neighbours")
        for a, b, k in rings:
            if not (0.0 <= a < b) or k < 1:
                raise ValueError(f"rings: each ring needs 0 <= inner < outer and k >= 1, got {(a, b, k)}")
        return rings

    def _neighbours(self, coords: np.ndarray | None, groups: np.ndarray | None, n: int) -> list:
        """One :class:`heads.neighbours.Neighbours` per ring (``None`` without coords)."""
        c = _check_coords(coords, n)
        if c is None:
            return [None] * len(self._check_params())
        return [find_neighbours(c, groups, k=k, radius=b, inner=a) for a, b, k in self._check_params()]

    @staticmethod
    def _mean_features(X: np.ndarray, nbs: list) -> np.ndarray:
        """``[X, masked mean of each ring]`` (n, (1 + rings) * dim) float32; a ring with no
        neighbour (or no coords) repeats the spot's own vector."""
        X = np.asarray(X, dtype=np.float32)
        parts = [X] + [X if nb is None else masked_neighbour_mean(X, nb).astype(np.float32) for nb in nbs]
        return np.concatenate(parts, axis=1)

    def _inner_nb(self) -> NBRegressor:
        return NBRegressor(
            alpha=self.alpha,
            alphas=CONTEXT_ALPHAS if self.alphas is None else self.alphas,
            cv=self.cv,
            n_components=self.n_components,
            max_iter=self.max_iter,
            random_state=self.random_state,
            device=self.device,
        )

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> ContextNBRegressor:
        """Fit on spot vectors ``X`` (n, dim), RAW counts ``y`` (n, G), slide labels
        ``groups`` (n,) (neighbours and the grouped CV stay within / hold out whole
        slides), total raw counts per spot ``library_size`` (n,) and spot centres
        ``coords`` (n, 2) in µm (one frame per slide; ``None``: no neighbours)."""
        self._check_params()
        X = check_X(X)
        n = X.shape[0]
        groups = check_groups(groups, n)
        nbs = self._neighbours(coords, groups, n)
        self.neighbour_counts_ = (
            np.bincount(nbs[0].count, minlength=self.rings[0][2] + 1) if nbs[0] is not None else np.array([n])
        )
        self.n_features_in_ = X.shape[1]
        if self.aggregation == "mean":
            model = self._inner_nb().fit(self._mean_features(X, nbs), y, groups=groups, library_size=library_size)
            self.alpha_ = model.alpha_
        else:
            n_att = self.attention_components if self.readout == "glm" else self.n_components
            model = AttentionNB(
                weight_decays=self.weight_decays,
                hidden=self.hidden,
                lr=self.lr,
                n_components=n_att,
                cv=self.cv,
                max_epochs=self.max_epochs,
                patience=self.patience,
                random_state=self.random_state,
                device=self.device,
            )
            model.fit(X, nbs, y, groups=groups, library_size=library_size)
            self.weight_decay_ = model.weight_decay_
            self.attention_ = model
            if self.readout == "glm":
                model = self._inner_nb().fit(
                    np.c_[X, model.attention_pool(X, nbs)], y, groups=groups, library_size=library_size
                )
                self.alpha_ = model.alpha_
        self.model_ = model
        self.n_genes_ = model.n_genes_
        self.ref_library_size_ = model.ref_library_size_
        return self

    # ------------------------------------------------------------------ predict
    def _distribution_at_ref(self, X: np.ndarray, groups=None, coords=None) -> NegativeBinomial:
        """The predictive NB at the reference depth from the spots' and their neighbours' vectors."""
        check_is_fitted(self, "model_")
        X = check_X(X, self.n_features_in_)
        n = X.shape[0]
        nbs = self._neighbours(coords, check_groups(groups, n), n)
        if self.aggregation == "mean":
            return self.model_.predict_distribution(self._mean_features(X, nbs))
        if self.readout == "glm":
            return self.model_.predict_distribution(np.c_[X, self.attention_.attention_pool(X, nbs)])
        log_mu, theta = self.model_.nb_at_ref(X, nbs)
        return NegativeBinomial(np.exp(log_mu), theta)


__all__ = ["AGGREGATIONS", "CONTEXT_ALPHAS", "DEFAULT_RINGS", "ContextNBRegressor"]
