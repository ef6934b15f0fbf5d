"""The head registry: one declarative :class:`HeadSpec` per head name, as the backbone
catalog is for backbones. ``compare``, ``train``, ``predict``, scoring, plots, the report
and the CLI read what they need from here; adding a head is one entry in :data:`HEADS`.

Adding a head
-------------
1. Write the estimator in ``heads/`` (arrays only) following the head contract stated in
   the ``heads`` package doc: ``fit(X, y, *, groups=None, library_size=None, coords=None)``
   returning ``self``; ``predict_outputs(X, *, library_size=None, groups=None,
   coords=None)`` returning named (n_spots, n_genes) arrays from
   ``heads.OUTPUT_COLUMNS`` (the one output method the runner calls); scikit-learn's
   ``NotFittedError`` before ``fit`` (``check_is_fitted``); ``spatial_context = True`` if a
   spot's prediction reads other spots passed with it.
2. Add one :class:`HeadSpec` to :data:`HEADS` below. Nothing else in ``stimage_embed``
   branches on the head's name or kind for fitting or predicting.

Output kinds (``HeadSpec.output``: how scoring, plots and the report read the columns):

* ``nb``: a negative-binomial head (``mean_log1p`` image-only; count-scale ``mean``,
  ``variance`` and quantiles from its predictive NB, for coverage);
* ``nb_ensemble``: several NB members (also ``epistemic`` / ``aleatoric``);
* ``classifier``: ``prob_high``, the probability of "high" expression; it is fitted on
  the labels of :func:`heads.highlow_labels` instead of counts;
* ``log1p``: a point prediction on the log1p(CP10k) scale (``mean_log1p``, ``mean``);
* ``combined``: built from other runs' predictions across backbones (FSTimage), never
  fitted on vectors;
* ``label``: ``predict_proba`` of a categorical label from the ``labels`` table, fitted
  on a label set (``--labels``) instead of counts: ``compare`` runs it on the same folds
  (:mod:`stimage_embed.evaluation.label_compare`), ``train``/``predict``/``infer`` save and
  apply it (:mod:`stimage_embed.predictions.label_train`,
  :mod:`stimage_embed.inference.label_predict`); its rows go to ``label_predictions`` and
  ``label_metrics``. Left out of the default gene-expression heads.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from stimage_embed.errors import InputError

OUTPUT_KINDS = ("nb", "nb_ensemble", "classifier", "log1p", "combined", "label")


@dataclass(frozen=True)
class HeadSpec:
    """A head as the rest of the package sees it.

    name: the CLI / store name; summary: one line for help texts and docs;
    output: one of :data:`OUTPUT_KINDS`; build: ``"module:callable"``, a class or factory
    ``**params -> unfitted head``, imported when first used (so the CLI starts without
    torch; ``None`` for a ``combined`` head); defaults: parameters the project sets differently from the
    class defaults (a user's parameters override them); baseline: shown as a baseline
    (grey in plots, excluded from "best model"); spans_backbones: combines several
    backbones' runs; marker: matplotlib marker in plots; takes_alpha_from: another head
    whose CV choice of ``alpha`` on the same fold it reuses (same data, same grouped folds:
    the same choice); combines: for a head spanning backbones, the per-backbone head whose
    runs it combines; spread: what its epistemic variance is a
    spread between (report legends), ``None`` if it has none.
    """

    name: str
    summary: str
    output: str
    build: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False
    spans_backbones: bool = False
    marker: str = "o"
    takes_alpha_from: str | None = None
    combines: str | None = None
    spread: str | None = None

    def make(self, params: Mapping[str, Any] | None = None) -> Any:
        """A fresh, unfitted head with ``defaults`` updated by ``params``."""
        if self.build is None:
            raise InputError(
                None, "--head", f"{self.name} is built by `compare` from other runs, not fitted on vectors"
            )
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)(**{**self.defaults, **(params or {})})


def seed_ensemble(n_members: int = 5, **params: Any) -> Any:
    """A :class:`heads.SeedEnsemble` of ``n_members`` :class:`heads.NBRegressor` (``params``)."""
    from heads import NBRegressor, SeedEnsemble

    return SeedEnsemble(NBRegressor(**params), n_members=n_members)


#: every head, in display order (baselines first)
HEADS: Mapping[str, HeadSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            HeadSpec(
                "mean",
                "training mean of log1p(CP10k) per gene (baseline)",
                "log1p",
                "heads:MeanBaseline",
                baseline=True,
                marker="x",
            ),
            HeadSpec(
                "ridge",
                "ridge on PCA of the vectors, alpha by CV grouped by slide (baseline)",
                "log1p",
                "heads:RidgeBaseline",
                baseline=True,
                marker="v",
            ),
            HeadSpec(
                "nb", "linear negative-binomial GLM, L2 by CV grouped by slide", "nb", "heads:NBRegressor", marker="o"
            ),
            HeadSpec(
                "ensemble",
                "5 bootstrapped NB GLMs: epistemic + aleatoric uncertainty",
                "nb_ensemble",
                f"{__name__}:seed_ensemble",
                defaults={"bootstrap": True},
                marker="s",
                takes_alpha_from="nb",
                spread="between seeds",
            ),
            HeadSpec(
                "context",
                "NB GLM on the spot's vector and its lattice neighbours' vectors (same slide)",
                "nb",
                "heads.context:ContextNBRegressor",
                marker="P",
            ),
            HeadSpec(
                "highlow",
                "elastic-net logistic classifiers of high/low expression (STimage)",
                "classifier",
                "heads:HighLowClassifier",
                defaults={"n_jobs": -1},
                marker="^",
            ),
            HeadSpec(
                "knn",
                "weighted mean of the k nearest training spots (BLEEP)",
                "log1p",
                "heads.knn:KNNRegressor",
                marker="*",
            ),
            HeadSpec(
                "fstimage",
                "FSTimage: the nb predictions of several backbones averaged",
                "combined",
                spans_backbones=True,
                combines="nb",
                marker="D",
                spread="between backbones",
            ),
            HeadSpec(
                "label",
                "multinomial elastic-net classifier of a categorical label per spot (labels table; STimage)",
                "label",
                "heads.label:LabelClassifier",
                marker="*",
            ),
        )
    }
)


def head_spec(name: str) -> HeadSpec:
    """The spec of ``name``; an :class:`InputError` naming the known heads otherwise."""
    spec = HEADS.get(name)
    if spec is None:
        raise InputError(None, "--head", f"unknown head {name!r}; choose from {', '.join(HEADS)}")
    return spec


def head_names(
    *, spans_backbones: bool | None = None, baseline: bool | None = None, output: str | None = None
) -> tuple[str, ...]:
    """Registered head names in display order, optionally filtered."""
    return tuple(
        s.name
        for s in HEADS.values()
        if (spans_backbones is None or s.spans_backbones == spans_backbones)
        and (baseline is None or s.baseline == baseline)
        and (output is None or s.output == output)
        and (s.output != "label" or output == "label")  # label heads learn a labels table, not genes
    )


def head_help() -> str:
    """One line per head for CLI help: ``name: summary``."""
    return "; ".join(f"{s.name}: {s.summary}" for s in HEADS.values())
