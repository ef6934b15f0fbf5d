"""NB heads trained on two slides: the old grouped-CV choice of alpha against the rule of
``heads/nb_alpha.py`` (CV of spots within slides), and ridge, in one run on one store.

Prints per head: the chosen alpha, the CV rule, the median per-gene range (max - min) of the
predicted log1p(CP10k) on the test slides, the mean PCC over genes there, and the ratio of
each range to ridge's.

    python benchmarks/bench_few_slides.py --store STORE --train B4,C4 --test C5
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import polars as pl

import heads.nb_alpha as rule
from stimage_embed.predictions.arrays import load_spot_arrays
from stimage_embed.predictions.genes import select_genes
from stimage_embed.predictions.runner import fit_head, make_head, predict_head
from stimage_embed.store import Store


def median_range(df: pl.DataFrame) -> float:
    wide = df.pivot(on="gene", index=["slide_id", "spot_id"], values="mean_log1p").drop("slide_id", "spot_id")
    v = wide.to_numpy()
    return float(np.median(v.max(axis=0) - v.min(axis=0)))


def mean_pcc(df: pl.DataFrame) -> float:
    df = df.with_columns((pl.col("observed") / pl.col("library_size") * 1e4).log1p().alias("truth"))
    per_gene = df.group_by("gene").agg(pl.corr("truth", "mean_log1p").alias("r"))
    return float(per_gene["r"].drop_nans().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--genes", default="var:50")
    ap.add_argument("--train", default="B4,C4")
    ap.add_argument("--test", default="C5")
    args = ap.parse_args()
    store, train, test = Store(args.store), args.train.split(","), args.test.split(",")
    keys, gl, counts, lib = store.expression_matrix(train)
    genes = select_genes(args.genes, counts, gl, keys["slide_id"].to_numpy(), train, library_size=lib)
    tr = load_spot_arrays(store, args.backbone, train, genes)
    te = load_spot_arrays(store, args.backbone, test, genes)
    rows = []
    for label, head, min_groups in (("nb, grouped CV (old)", "nb", 2), ("nb, rule", "nb", 3), ("ridge", "ridge", 3)):
        rule.MIN_CV_GROUPS = min_groups
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            model = fit_head(head, make_head(head), tr)
        pred = predict_head(head, model, te)
        rows.append(
            (
                label,
                model.alpha_,
                getattr(model, "cv_rule_", getattr(model, "cv_strategy_", "")),
                median_range(pred),
                mean_pcc(pred),
            )
        )
    rule.MIN_CV_GROUPS = 3
    ridge_range = rows[-1][3]
    print(f"train {train} -> test {test}, {args.backbone}, {args.genes} ({len(genes)} genes)")
    print(f"{'head':24s} {'alpha':>8s} {'cv rule':22s} {'range':>7s} {'x ridge':>8s} {'PCC':>6s}")
    for label, alpha, cv_rule, rng, pcc in rows:
        print(f"{label:24s} {alpha:8.3g} {cv_rule:22s} {rng:7.3f} {rng / ridge_range:8.3f} {pcc:6.3f}")


if __name__ == "__main__":
    main()
