"""Negative-binomial regression head: embeddings -> per-gene NB over RAW counts.

What it predicts (and from what)
--------------------------------
A prediction is a function of the spot's image vector only. The head predicts, per spot
and gene, the NB mean at the reference depth ``ref_library_size_`` (the median library
size of the TRAINING spots, a constant learned in ``fit``), i.e. a predicted *rate*
``rate = mu / ref_library_size_`` (expected fraction of the spot's counts).
:meth:`NBRegressor.predict_log1p_norm` returns ``log1p(rate * target_sum)``: the log1p(CP10k)
of the predicted rate, the scale the evaluation scores on. Nothing measured on a spot
being predicted (its counts, its library size) enters it. ``predict``/``predict_dist``
accept a ``library_size`` only to express the count-scale predictive distribution at a
given depth (a technical covariate, used for interval coverage, never for PCC/MSE).

Model
-----
``X`` is standardised (``StandardScaler`` on the fit rows).

* ``solver="lbfgs"`` (default for ``hidden=0`` and the mean/dispersion parametrisation):
  a linear NB GLM per gene, ``log mu = X_std @ coef_ + intercept_ + log(library_size /
  ref)`` with one dispersion ``theta_`` per gene (``Var = mu + mu**2 / theta``), fitted to
  convergence by full-batch L-BFGS with an L2 penalty ``alpha * mean_g ||coef_g||**2``
  on the mean NLL per (spot, gene) (see :mod:`heads.nb_glm`). ``alpha=None`` chooses the
  L2 strength from ``alphas`` by CV grouped by slide: each fold holds out whole training
  slides, every (fold, alpha) model is fitted at once as one batched tensor, and the
  alpha with the lowest held-out NB NLL wins; then one model is refitted on all the fit
  rows with it. With fewer than 3 training slides the folds are spots within slides
  instead (:mod:`heads.nb_alpha`, ``cv_rule_``); a choice at an end of the path warns.
  The features are first projected on their ``n_components`` leading principal
  components (``None``: all of them, exact: the L2 optimum lies in the row space of the
  standardised training features, which the SVD parametrises).
  ``bootstrap=True`` refits on a Poisson(1) bootstrap of the rows (``random_state``) —
  what makes seed-ensemble members differ (a convex fit ignores the seed otherwise).
* ``solver="adam"`` (hidden layer, or STimage's r/p, :mod:`heads.nb_network`): a network
  trained by Adam with ``weight_decay`` (L2) on the mean NB NLL per (spot, gene), early
  stopping on a validation split holding out whole ``groups``
  (:func:`heads.validation_split.validation_split`). ``parametrisation="stimage"`` is
  STimage's ``r = softplus(a)``, ``p = sigmoid(b - log(library_size / ref))`` (STimage
  itself has no offset: ``use_library_offset=False`` reproduces it).

Randomness (bootstrap, init, split, batch order, dropout) comes from ``random_state``
through local generators, so a fixed seed gives identical results on CPU.

Outputs: the predictive :class:`heads.distributions.NegativeBinomial` (mean ``mu``,
dispersion ``theta``, ``Var = mu + mu**2 / theta``) and everything derived from it
(:class:`heads.outputs.NBOutputs`: ``predict_distribution``, ``predict_rate``,
``predict``, ``predict_log1p_norm``, ``predict_dist``, ``predict_outputs``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from heads.device import resolve_device
from heads.distributions import NBPrediction, NegativeBinomial
from heads.inputs import check_counts, check_groups, check_library_size, check_X
from heads.nb_alpha import choose_alpha
from heads.nb_glm import fit_nb_glm, principal_components
from heads.nb_network import AdamSchedule, NBNet, train_network
from heads.outputs import NBOutputs
from heads.validation_split import validation_split

logger = logging.getLogger(__name__)

PARAMETRISATIONS = ("mean_dispersion", "stimage")
SOLVERS = ("auto", "lbfgs", "adam")
#: where the CV's L2 path starts when none is given (strength per gene, relative to the mean
#: NLL per (spot, gene)); extended by factors of sqrt(10) past an end while the best alpha is
#: there (:func:`heads.nb_alpha.select_alpha_adaptive`). On the HER2ST and MOB leave-one-slide-out
#: folds (700-1,200 training spots) the best alpha was 3-30 on every fold; the old fixed path
#: 0.1-100 spent most of its CV time on 0.1 and 0.3, the slowest fits.
DEFAULT_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0)
_PILOT_ALPHA = 1.0  # L2 of the pilot fit that estimates the dispersions held fixed during the CV
_PREDICT_CHUNK = 8192


def _checked_fit_inputs(X, y, groups, library_size) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(X, y, library_size, groups)`` checked for a fit (see :mod:`heads.inputs`)."""
    X = check_X(X)
    n = X.shape[0]
    y = check_counts(y, n)
    return X, y, check_library_size(library_size, y, n), check_groups(groups, n)


class NBRegressor(NBOutputs, BaseEstimator):
    """Per-gene negative-binomial regression on spot embeddings (see module doc).

    Parameters
    ----------
    hidden : 0 for a linear model, else the width of one hidden ReLU layer (``adam``).
    dropout : ``adam`` only: dropout rate on the inputs (``hidden=0``) or hidden units.
    parametrisation : ``"mean_dispersion"`` or ``"stimage"`` (``adam`` only).
    solver : ``"auto"`` (``lbfgs`` for a linear mean/dispersion model, else ``adam``),
        ``"lbfgs"`` or ``"adam"``.
    alpha : ``lbfgs``: L2 strength; ``None`` = chosen from ``alphas`` by CV grouped by slide,
        or, with fewer than 3 training slides, by CV of spots within slides
        (:mod:`heads.nb_alpha`); a choice at an end of the path warns (``AlphaAtPathEnd``).
    alphas : ``lbfgs``: the L2 path for the CV, used as given; ``None``: :data:`DEFAULT_ALPHAS`,
        extended past an end while the best alpha is at that end (down to 1e-3, up to 1e4).
    cv : ``lbfgs``: number of grouped CV folds (at most the number of groups).
    n_components : ``lbfgs``: leading principal components of the standardised features
        to regress on (default 256, HEST's ridge choice; ``None``: all, exact). On HER2ST
        leave-one-slide-out (Lite0, var:50) 256 and all components gave the same mean PCC
        (0.111 vs 0.107 on B4, 0.23 on C2) at a third of the fit time.
    bootstrap : ``lbfgs``: refit on a Poisson(1) bootstrap of the rows (seed ensembles).
    max_iter : ``lbfgs``: L-BFGS iterations.
    lr, weight_decay, max_epochs, batch_size, patience, val_fraction : ``adam`` only:
        Adam learning rate and L2, epochs, mini-batch size (``None``: full batch),
        early-stopping patience, fraction of groups held out for early stopping.
    use_library_offset : model counts relative to the spot's library size (default True).
    random_state : seed (int); ``None`` = random.
    device : ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``...

    Learned attributes: ``scaler_mean_``, ``scaler_scale_`` (float64, (dim,)),
    ``n_features_in_``, ``n_genes_``, ``ref_library_size_`` (raw counts), ``solver_``,
    ``seed_``. ``lbfgs``: ``coef_`` (dim, n_genes) on standardised features,
    ``intercept_`` (n_genes,) log mean at the reference depth, ``theta_`` (n_genes,),
    ``alpha_``, ``alphas_`` and ``cv_loss_`` (held-out mean NB NLL per alpha; empty when
    ``alpha`` was given), ``cv_groups_`` (the groups held out in each CV fold), ``cv_rule_``
    (the CV's fold rule, ``heads.nb_alpha.CV_RULES``; ``""`` when ``alpha`` was given),
    ``n_iter_``. ``adam``: ``module_`` (torch module), ``history_`` (``{"train": [...],
    "val": [...]}`` mean NLL per (spot, gene) per epoch), ``best_epoch_``, ``n_epochs_``,
    ``train_index_``/``val_index_``.
    """

    def __init__(
        self,
        hidden: int = 0,
        dropout: float = 0.1,
        parametrisation: str = "mean_dispersion",
        solver: str = "auto",
        alpha: float | None = None,
        alphas: tuple[float, ...] | None = None,
        cv: int = 5,
        n_components: int | None = 256,
        bootstrap: bool = False,
        max_iter: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 300,
        batch_size: int | None = None,
        patience: int = 20,
        val_fraction: float = 0.2,
        use_library_offset: bool = True,
        random_state: int | None = 0,
        device: str = "auto",
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.parametrisation = parametrisation
        self.solver = solver
        self.alpha = alpha
        self.alphas = alphas
        self.cv = cv
        self.n_components = n_components
        self.bootstrap = bootstrap
        self.max_iter = max_iter
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.val_fraction = val_fraction
        self.use_library_offset = use_library_offset
        self.random_state = random_state
        self.device = device

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        if self.parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"parametrisation: expected one of {PARAMETRISATIONS}, got {self.parametrisation!r}")
        if int(self.hidden) < 0:
            raise ValueError(f"hidden: must be >= 0, got {self.hidden}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size: must be None or >= 1, got {self.batch_size}")
        if int(self.max_epochs) < 1:
            raise ValueError(f"max_epochs: must be >= 1, got {self.max_epochs}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {self.solver!r}")
        if self._solver() == "lbfgs" and (int(self.hidden) > 0 or self.parametrisation != "mean_dispersion"):
            raise ValueError(
                "solver: 'lbfgs' fits the linear mean/dispersion GLM; use solver='adam' for hidden layers or 'stimage'"
            )
        if self.alpha is not None and float(self.alpha) < 0:
            raise ValueError(f"alpha: must be >= 0 or None, got {self.alpha}")
        if self.n_components is not None and int(self.n_components) < 1:
            raise ValueError(f"n_components: must be None or >= 1, got {self.n_components}")
        if int(self.cv) < 2:
            raise ValueError(f"cv: must be >= 2 folds, got {self.cv}")

    def _solver(self) -> str:
        if self.solver != "auto":
            return self.solver
        return "lbfgs" if int(self.hidden) == 0 and self.parametrisation == "mean_dispersion" else "adam"

    def make_module(self) -> NBNet:
        """A fresh (uninitialised) network for the fitted sizes (used by fit and load)."""
        return NBNet(self.n_features_in_, self.n_genes_, int(self.hidden), self.dropout, self.parametrisation)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return ((X.astype(np.float64) - self.scaler_mean_) / self.scaler_scale_).astype(np.float32)

    def _log_offset(self, library_size: np.ndarray) -> np.ndarray:
        if not self.use_library_offset:
            return np.zeros(library_size.shape[0], dtype=np.float32)
        return np.log(library_size / self.ref_library_size_).astype(np.float32)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> NBRegressor:
        """Fit on embeddings ``X`` (n_spots, dim) and RAW counts ``y`` (n_spots, n_genes).

        ``groups``: slide/patient label per spot; the L2 CV (``lbfgs``, see
        :mod:`heads.nb_alpha` for its rule with fewer than 3 slides) and early stopping
        (``adam``) then hold out whole groups. Without ``groups`` they fall back to random
        splits of spots (optimistic: neighbouring spots land on both sides).
        ``library_size``: total raw counts per spot over ALL genes (pass it!); default
        ``y.sum(1)`` over the given genes only. ``coords``: not used (a per-spot model).
        """
        return self.fit_members(X, y, seeds=None, groups=groups, library_size=library_size)[0]

    # ------------------------------------------------------------------ lbfgs
    def _seed(self, seed: int | None = None) -> int:
        if seed is not None:
            return int(seed)
        return int(np.random.default_rng().integers(2**31 - 1)) if self.random_state is None else int(self.random_state)

    def _select_alpha(self, Z, y, offset, groups, seed, log_theta) -> dict:
        """The CV choice of ``alpha`` (:func:`heads.nb_alpha.choose_alpha`) as learned attributes."""
        cv = choose_alpha(
            Z, y, offset, groups, self.alphas, DEFAULT_ALPHAS, int(self.cv), seed, log_theta, int(self.max_iter),
            resolve_device(self.device),
        )  # fmt: skip
        return dict(alpha_=cv.alpha, alphas_=cv.alphas, cv_loss_=cv.cv_loss, cv_groups_=cv.cv_groups, cv_rule_=cv.rule)

    def fit_members(
        self,
        X: np.ndarray,
        y: np.ndarray,
        seeds: list[int] | None = None,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> list[NBRegressor]:
        """Fit one model per seed (``None``: this estimator alone). ``lbfgs``: in ONE batched
        L-BFGS fit, sharing the standardisation, the principal components and the CV choice
        of ``alpha``; members differ by their bootstrap of the rows when ``bootstrap=True``.
        ``adam``: one clone per seed (``random_state``), fitted in turn.
        Returns fitted estimators (``self`` first when ``seeds`` is ``None``)."""
        self._check_params()
        if self._solver() != "lbfgs":
            if seeds is None:
                return [self._fit_adam(X, y, groups, library_size)]
            return [clone(self).set_params(random_state=int(s))._fit_adam(X, y, groups, library_size) for s in seeds]
        X, y, lib, groups = _checked_fit_inputs(X, y, groups, library_size)
        n = X.shape[0]
        seed = self._seed()
        scaler = StandardScaler().fit(X)
        Xs = (X.astype(np.float64) - scaler.mean_) / scaler.scale_
        ref = float(np.median(lib))
        offset = np.log(lib / ref) if self.use_library_offset else np.zeros(n)
        Z, V = principal_components(Xs, self.n_components)
        shared = {
            "scaler_mean_": scaler.mean_.astype(np.float64),
            "scaler_scale_": scaler.scale_.astype(np.float64),
            "n_features_in_": X.shape[1],
            "n_genes_": y.shape[1],
            "ref_library_size_": ref,
            "solver_": "lbfgs",
            "n_components_": int(V.shape[1]),
        }
        device = resolve_device(self.device)
        pilot_alpha = _PILOT_ALPHA if self.alpha is None else float(self.alpha)
        pilot = fit_nb_glm(
            Z, y, offset, np.ones((1, n)), np.array([pilot_alpha]), max_iter=int(self.max_iter), device=device
        )
        log_theta = pilot.log_theta[0]
        if self.alpha is None:
            shared.update(self._select_alpha(Z, y, offset, groups, seed, log_theta))
        else:
            none = dict(alphas_=np.zeros(0), cv_loss_=np.zeros(0), cv_groups_=[], cv_rule_="")
            shared.update(alpha_=float(self.alpha), **none)
        members = [self] if seeds is None else [clone(self).set_params(random_state=int(s)) for s in seeds]
        member_seeds = [self._seed() if seeds is None else int(s) for s in (seeds or [None])]
        weights = np.ones((len(members), n))
        if self.bootstrap:
            for i, s in enumerate(member_seeds):
                weights[i] = np.random.default_rng(s).poisson(1.0, n)
                if weights[i].sum() == 0:
                    weights[i] = 1.0
        fit = fit_nb_glm(
            Z,
            y,
            offset,
            weights,
            np.full(len(members), shared["alpha_"]),
            log_theta=log_theta,
            max_iter=int(self.max_iter),
            device=device,
        )
        if not fit.converged:
            logger.info("NBRegressor: L-BFGS stopped at max_iter=%d before the tolerance", self.max_iter)
        for i, (m, s) in enumerate(zip(members, member_seeds)):
            for k, v in shared.items():
                setattr(m, k, v)
            m.seed_ = s
            m.coef_ = np.ascontiguousarray(V @ fit.coef[i])
            m.intercept_ = np.ascontiguousarray(fit.intercept[i])
            m.theta_ = np.ascontiguousarray(np.exp(fit.log_theta[i]))
            m.n_iter_ = int(fit.n_iter)
        return members

    # ------------------------------------------------------------------ adam
    def _fit_adam(self, X, y, groups, library_size) -> NBRegressor:
        """The network path (hidden layer / STimage r,p): Adam + early stopping."""
        X, y, lib, groups = _checked_fit_inputs(X, y, groups, library_size)
        n = X.shape[0]
        seed = self._seed()
        self.seed_ = seed
        self.solver_ = "adam"

        train_idx, val_idx = validation_split(n, groups, float(self.val_fraction), seed)
        self.train_index_, self.val_index_ = train_idx, val_idx
        scaler = StandardScaler().fit(X[train_idx])
        self.scaler_mean_ = scaler.mean_.astype(np.float64)
        self.scaler_scale_ = scaler.scale_.astype(np.float64)
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = y.shape[1]
        self.ref_library_size_ = float(np.median(lib))

        device = resolve_device(self.device)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = cpu_gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)

        module = self.make_module()
        y_norm = (
            y[train_idx] / lib[train_idx, None] * self.ref_library_size_ if self.use_library_offset else y[train_idx]
        )
        self.module_ = module
        module.initialise(y_norm, cpu_gen)
        module.to(device)
        schedule = AdamSchedule(
            float(self.lr), float(self.weight_decay), self.batch_size, int(self.max_epochs), int(self.patience)
        )
        result = train_network(
            module,
            torch.as_tensor(self._standardise(X), device=device),
            torch.as_tensor(y.astype(np.float32), device=device),
            torch.as_tensor(self._log_offset(lib), device=device),
            train_idx,
            val_idx,
            schedule,
            cpu_gen,
            dev_gen,
        )
        history, best_epoch = result.history, result.best_epoch
        self.history_ = history
        self.best_epoch_ = int(best_epoch)
        self.n_epochs_ = len(history["train"])
        logger.debug("NBRegressor: %d epochs, best %d", self.n_epochs_, self.best_epoch_)
        return self

    # ------------------------------------------------------------------ predict
    def _distribution_at_ref(self, X: np.ndarray, groups=None, coords=None) -> NegativeBinomial:
        """The predictive NB at the reference depth (see :class:`heads.outputs.NBOutputs`)."""
        check_is_fitted(self, "ref_library_size_")
        X = check_X(X, self.n_features_in_)
        if getattr(self, "solver_", "adam") == "lbfgs":
            Xs = (X.astype(np.float64) - self.scaler_mean_) / self.scaler_scale_
            return NegativeBinomial(np.exp(Xs @ self.coef_ + self.intercept_), self.theta_)
        log_mu, theta = self.module_.nb_at_ref(self._standardise(X), _PREDICT_CHUNK)
        return NegativeBinomial(np.exp(log_mu), theta)

    def score(self, X: np.ndarray, y: np.ndarray, *, library_size: np.ndarray | None = None) -> float:
        """Mean NB log-likelihood per (spot, gene) of RAW counts ``y`` (higher is better);
        ``library_size`` default ``y.sum(1)``."""
        X = check_X(X)
        y = check_counts(y, X.shape[0])
        lib = check_library_size(library_size, y, X.shape[0])
        return float(np.mean(self.predict_distribution(X, library_size=lib).log_prob(y)))


__all__ = ["DEFAULT_ALPHAS", "NBPrediction", "NBRegressor"]
