"""Ensembles: seeds of one head (:class:`SeedEnsemble`), and the average of several
backbones' predictions aligned by (slide, spot) key (:func:`combine_predictions`, what
STimage's FSTimage is: ``stimage_embed.predictions.fstimage`` applies it to stored runs).

All means/variances are RAW counts (counts^2) at the requested library size.
Variances across members are population variances (``ddof=0``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from heads.distributions import NegativeBinomial
from heads.nb import NBRegressor
from heads.outputs import quantile_columns
from heads.scale import TARGET_SUM, rate_to_log1p

logger = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "drop", "available")


@dataclass(frozen=True)
class Uncertainty:
    """Law of total variance over ensemble members, per spot and gene (counts^2).

    ``epistemic`` = variance of the member means (ddof=0), ``aleatoric`` = mean of the
    member predictive variances, ``total = epistemic + aleatoric``; ``mean`` = mean of the
    member means.
    """

    mean: np.ndarray
    epistemic: np.ndarray
    aleatoric: np.ndarray
    total: np.ndarray


class SeedEnsemble(BaseEstimator):
    """``n_members`` clones of ``base_estimator`` with different ``random_state``.

    ``seeds``: explicit seeds (length ``n_members``); default ``0 .. n_members-1``.
    ``fit`` passes its keyword extras (``groups``, ``library_size``, ``coords``) to every
    member, and so do the prediction methods (``groups``, ``coords``). A base estimator with
    a public ``fit_members(X, y, seeds, **extras)`` (:class:`NBRegressor`: the linear one fits
    all members at once, as one tensor with a member dimension, sharing its CV choice of the
    L2 strength; with ``bootstrap=True`` the members differ by their bootstrap resample of
    the rows) fits them; any other is cloned per seed (``random_state``).
    Learned: ``members_`` (fitted clones), ``seeds_``, ``ref_library_size_`` (of the first
    member), ``n_features_in_``, ``n_genes_``.
    """

    def __init__(self, base_estimator: Any = None, n_members: int = 5, seeds: Sequence[int] | None = None):
        self.base_estimator = base_estimator
        self.n_members = n_members
        self.seeds = seeds

    def _seeds(self) -> list[int]:
        if self.seeds is None:
            return list(range(int(self.n_members)))
        seeds = [int(s) for s in self.seeds]
        if len(seeds) != int(self.n_members):
            raise ValueError(f"seeds: {len(seeds)} seeds for n_members={self.n_members}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: must be distinct, got {seeds}")
        return seeds

    @property
    def spatial_context(self) -> bool:
        """Whether the members read neighbouring spots (then predict whole slides)."""
        return bool(getattr(self.base_estimator, "spatial_context", False))

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> SeedEnsemble:
        """Fit the members on ``X``, RAW counts ``y`` and the keyword extras (see the class doc)."""
        if int(self.n_members) < 1:
            raise ValueError(f"n_members: must be >= 1, got {self.n_members}")
        base = NBRegressor() if self.base_estimator is None else self.base_estimator
        self.seeds_ = self._seeds()
        extras = dict(groups=groups, library_size=library_size, coords=coords)
        if hasattr(base, "fit_members"):
            self.members_ = clone(base).fit_members(X, y, seeds=self.seeds_, **extras)
        else:
            self.members_ = [clone(base).set_params(random_state=s).fit(X, y, **extras) for s in self.seeds_]
        self._set_learned_from_members()
        return self

    def _set_learned_from_members(self) -> None:
        first = self.members_[0]
        for attr in ("ref_library_size_", "n_features_in_", "n_genes_"):
            if hasattr(first, attr):
                setattr(self, attr, getattr(first, attr))

    def predict(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> np.ndarray:
        """Mean of the member means (RAW counts at ``library_size``)."""
        return self.predict_uncertainty(X, library_size=library_size, groups=groups, coords=coords).mean

    def predict_rate(self, X: np.ndarray, *, groups=None, coords=None) -> np.ndarray:
        """Mean of the member rates (expected fraction of a spot's counts), from the image
        vectors alone; members must provide ``predict_rate``."""
        check_is_fitted(self, "members_")
        return np.mean([m.predict_rate(X, groups=groups, coords=coords) for m in self.members_], axis=0)

    def predict_log1p_norm(self, X: np.ndarray, *, target_sum: float = TARGET_SUM, groups=None, coords=None):
        """``log1p(mean member rate * target_sum)`` (log1p(CP10k) for 1e4)."""
        return np.log1p(self.predict_rate(X, groups=groups, coords=coords) * target_sum)

    def predict_uncertainty(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> Uncertainty:
        """Epistemic / aleatoric / total variance (see :class:`Uncertainty`); members must
        provide ``predict_distribution(X, library_size=..., groups=..., coords=...)`` with
        ``.mean`` and ``.variance``."""
        check_is_fitted(self, "members_")
        extras = dict(library_size=library_size, groups=groups, coords=coords)
        dists = [m.predict_distribution(X, **extras) for m in self.members_]
        means = np.stack([d.mean for d in dists])
        variances = np.stack([d.variance for d in dists])
        epistemic = means.var(axis=0, ddof=0)
        aleatoric = variances.mean(axis=0)
        return Uncertainty(
            mean=means.mean(axis=0), epistemic=epistemic, aleatoric=aleatoric, total=epistemic + aleatoric
        )

    def predict_outputs(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> dict[str, np.ndarray]:
        """The value columns (:mod:`heads.outputs`): the mixture's mean and its total variance
        split in ``epistemic`` + ``aleatoric``, quantiles of the NB with those moments, and
        ``mean_log1p`` of the mean member rate."""
        unc = self.predict_uncertainty(X, library_size=library_size, groups=groups, coords=coords)
        return dict(
            mean=unc.mean,
            variance=unc.total,
            epistemic=unc.epistemic,
            aleatoric=unc.aleatoric,
            mean_log1p=rate_to_log1p(self.predict_rate(X, groups=groups, coords=coords)),
            **quantile_columns(NegativeBinomial.from_moments(unc.mean, unc.total)),
        )


# --------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class CombinedPrediction:
    """Predictions of several backbones aligned by key.

    ``keys``: (n, 2) object array of (slide, spot) strings; ``mean``: (n, g) average of the
    member means available for each key; ``spread``: (n, g) variance (ddof=0) of those
    member means (between-backbone disagreement; 0 where one backbone is available);
    ``n_backbones``: (n,) members contributing to each key; ``aleatoric``: (n, g) mean of
    the member predictive variances when every member supplied variances, else ``None``;
    ``backbones``: member names in combination order.
    """

    keys: np.ndarray
    mean: np.ndarray
    spread: np.ndarray
    n_backbones: np.ndarray
    aleatoric: np.ndarray | None
    backbones: tuple[str, ...]


def normalise_keys(keys: Any, name: str = "keys") -> list[tuple[str, str]]:
    """(slide, spot) keys from an (n, 2) array, a list of pairs, or a structured/record
    array with two fields -> list of ``(str, str)``; duplicates are refused."""
    arr = np.asarray(keys, dtype=object) if not (isinstance(keys, np.ndarray) and keys.dtype.names) else keys
    if isinstance(arr, np.ndarray) and arr.dtype.names:
        f0, f1 = arr.dtype.names[:2]
        out = [(str(a), str(b)) for a, b in zip(arr[f0], arr[f1])]
    else:
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{name}: expected (n, 2) (slide, spot) keys, got shape {arr.shape}")
        out = [(str(a), str(b)) for a, b in arr]
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: {len(out) - len(set(out))} duplicate (slide, spot) keys")
    return out


def _member_arrays(preds: Mapping[str, tuple]) -> tuple[dict, dict, dict, int]:
    """Checked (keys, mean, variance) of every backbone of :func:`combine_predictions` and
    the common number of genes."""
    keys_b: dict[str, list[tuple[str, str]]] = {}
    means_b: dict[str, np.ndarray] = {}
    vars_b: dict[str, np.ndarray | None] = {}
    n_genes = None
    for name in preds:
        entry = preds[name]
        if len(entry) not in (2, 3):
            raise ValueError(f"preds[{name!r}]: expected (keys, mean) or (keys, mean, variance)")
        keys_b[name] = normalise_keys(entry[0], f"preds[{name!r}].keys")
        mean = np.asarray(entry[1], dtype=np.float64)
        if mean.ndim != 2 or mean.shape[0] != len(keys_b[name]):
            raise ValueError(f"preds[{name!r}].mean: expected ({len(keys_b[name])}, n_genes), got {mean.shape}")
        n_genes = mean.shape[1] if n_genes is None else n_genes
        if mean.shape[1] != n_genes:
            raise ValueError(f"preds[{name!r}].mean: {mean.shape[1]} genes, other backbones have {n_genes}")
        means_b[name] = mean
        var = None if len(entry) == 2 or entry[2] is None else np.asarray(entry[2], dtype=np.float64)
        if var is not None and var.shape != mean.shape:
            raise ValueError(f"preds[{name!r}].variance: shape {var.shape} != mean shape {mean.shape}")
        vars_b[name] = var
    return keys_b, means_b, vars_b, n_genes


def combine_predictions(preds: Mapping[str, tuple], missing: str = "error") -> CombinedPrediction:
    """Average per-backbone predictions aligned by (slide, spot) key.

    ``preds[name] = (keys, mean)`` or ``(keys, mean, variance)`` with ``keys`` (n_b, 2)
    and ``mean``/``variance`` (n_b, g), same genes (columns) for every backbone.

    ``missing`` decides what happens to keys absent from some backbone:
    ``"error"`` raises ``ValueError`` naming each backbone and how many keys it lacks;
    ``"drop"`` keeps the keys present in every backbone (order of the first backbone);
    ``"available"`` keeps the union (first backbone's order, then new keys in order of
    appearance) and averages what exists, reporting ``n_backbones`` per key.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing: expected one of {MISSING_POLICIES}, got {missing!r}")
    if not preds:
        raise ValueError("preds: no backbones given")
    names = tuple(preds)
    keys_b, means_b, vars_b, n_genes = _member_arrays(preds)

    union: dict[tuple[str, str], int] = {}
    for name in names:
        for k in keys_b[name]:
            union.setdefault(k, len(union))
    sets = {name: set(keys_b[name]) for name in names}
    lacking = {name: len(union) - len(sets[name]) for name in names if len(sets[name]) < len(union)}
    if lacking and missing == "error":
        detail = ", ".join(f"backbone {name!r} lacks {n} keys" for name, n in lacking.items())
        raise ValueError(f"missing keys across backbones ({detail}); use missing='drop' or 'available'")
    if missing == "drop":
        common = set.intersection(*sets.values())
        out_keys = [k for k in keys_b[names[0]] if k in common]
    else:
        out_keys = list(union)
    pos = {k: i for i, k in enumerate(out_keys)}
    n = len(out_keys)

    total = np.zeros((n, n_genes))
    count = np.zeros(n, dtype=np.int64)
    have_var = all(v is not None for v in vars_b.values())
    var_total = np.zeros((n, n_genes)) if have_var else None
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        src = np.array([i for i, k in enumerate(keys_b[name]) if k in pos], dtype=np.int64)
        dst = np.array([pos[keys_b[name][i]] for i in src], dtype=np.int64)
        rows[name] = (src, dst)
        total[dst] += means_b[name][src]
        count[dst] += 1
        if var_total is not None:
            var_total[dst] += vars_b[name][src]
    c = count[:, None].astype(np.float64)
    mean = total / c
    # variance of the member means (ddof=0), two-pass for accuracy
    sq = np.zeros((n, n_genes))
    for name in names:
        src, dst = rows[name]
        sq[dst] += (means_b[name][src] - mean[dst]) ** 2
    spread = sq / c
    keys_arr = np.empty((n, 2), dtype=object)
    if n:
        keys_arr[:] = out_keys
    return CombinedPrediction(
        keys=keys_arr,
        mean=mean,
        spread=spread,
        n_backbones=count,
        aleatoric=None if var_total is None else var_total / c,
        backbones=names,
    )
