"""Issue 12 benchmark: spatial-context heads against the per-spot NB head, side by side in
one run, leave-one-slide-out on cached vectors.

Per dataset and fold (test slide), with ``var:K`` genes chosen from the fold's training
slides only (``predictions.genes.fold_genes``), every design is fitted on the training
slides' QC spots and scored on the test slide: PCC per gene between log1p(CP10k) of the
measured counts and ``log1p(rate * 1e4)`` of the predicted rate (image only), averaged over
genes. Designs:

* ``nb``: :class:`heads.NBRegressor` (per spot; the baseline);
* ``context``: :class:`heads.ContextNBRegressor` (masked means of ring 1 and ring 2
  neighbours' vectors + own vector, NB GLM, L2 by grouped CV);
* ``context_r1``: the same with ring 1 only (<= 1.5 pitch);
* ``attention``: ``aggregation="attention"`` (learned attention with a relative-position
  encoding pools the neighbours; NB GLM readout);
* ``attention_net``: the attention network's own readout (Adam, early stopping);
* ``nb+ctxW`` / ``context+ctxW``: the spot vector concatenated with the wider window's
  vector (``--context-backbone``, e.g. ``efficientnet_lite0__ctx300um`` from
  ``embed --context-um 300``), given to nb / context;
* ``<design>:shuffled``: the leak control, vectors (and wider-window vectors) permuted
  among the spots of each slide (``shuffled_within_slides``); must be ~0.

Printed: per-fold mean PCC of each design, its fit time, the ratio of the mean PCC to nb's,
and the paired difference to nb over (fold, gene) pairs with its bootstrap 95 % CI
(``evaluation.paired.compare_pair``).

    python benchmarks/bench_context.py --store /tmp/ws_ctx [--datasets her2st,stutility_mob]
        [--designs nb,context,attention,nb+ctx,context+ctx] [--context-backbone efficientnet_lite0__ctx300um]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
import polars as pl
import torch
from _common import table

from heads import ContextNBRegressor, NBRegressor
from heads.scale import log1p_normalise
from stimage_embed.evaluation.metrics import pearson
from stimage_embed.evaluation.paired import compare_pair
from stimage_embed.predictions.arrays import load_spot_arrays, shuffled_within_slides
from stimage_embed.predictions.genes import fold_genes
from stimage_embed.store import Store

log = logging.getLogger("bench_context")

DESIGNS = ("nb", "context", "context_r1", "attention", "attention_net", "nb+ctx", "context+ctx")


def make(design: str):
    base = design.split("+")[0]
    if base == "nb":
        return NBRegressor(device="cpu")
    if base == "context":
        return ContextNBRegressor(device="cpu")
    if base == "context_r1":
        return ContextNBRegressor(rings=((0.0, 1.5, 8),), device="cpu")
    if base == "attention":
        return ContextNBRegressor(aggregation="attention", device="cpu")
    if base == "attention_net":
        return ContextNBRegressor(aggregation="attention", readout="net", device="cpu")
    raise SystemExit(f"unknown design {design!r}; choose from {DESIGNS}")


def coords_um(store: Store, keys: pl.DataFrame) -> np.ndarray:
    """Spot centres in µm: level-0 pixels x the slide's µm/px."""
    umpp = pl.from_arrow(store.read("slides", ["slide_id", "um_per_px"]))
    k = keys.select("slide_id", "pixel_x", "pixel_y").join(umpp, on="slide_id", how="left", maintain_order="left")
    return np.c_[k["pixel_x"].to_numpy(), k["pixel_y"].to_numpy()] * k["um_per_px"].to_numpy()[:, None]


def features(
    store: Store, backbone: str, ctx_backbone: str | None, slides: list[str], genes: list[str], shuffled: bool
):
    """(X, X with the wider windows' vectors appended or None, counts, lib, groups, coords);
    ``ctx_backbone``: comma-separated context tables (pseudo-backbones), appended in order."""
    a = load_spot_arrays(store, backbone, slides, genes)
    wide = None
    for name in [c for c in (ctx_backbone or "").split(",") if c]:
        w = load_spot_arrays(store, name, slides, genes)
        if not w.keys.select("slide_id", "spot_id").equals(a.keys.select("slide_id", "spot_id")):
            raise SystemExit(f"{name}: not the same QC spots as {backbone}; embed every spot with --context-um")
        wide = w.X if wide is None else np.concatenate([wide, w.X], axis=1)
    if shuffled:  # the same permutation for the spot and the wider-window vectors
        order = shuffled_within_slides(dataclasses.replace(a, X=np.arange(len(a.X))[:, None])).X[:, 0]
        a = dataclasses.replace(a, X=a.X[order])
        wide = None if wide is None else wide[order]
    Xw = None if wide is None else np.concatenate([a.X, wide], axis=1)
    return a.X, Xw, a.counts, a.library_size, a.groups, coords_um(store, a.keys)


def run_fold(store, backbone, ctx_backbone, slides, test, genes_spec, designs):
    train = [s for s in slides if s != test]
    genes = fold_genes(store, train, genes_spec)
    out = []
    for shuffled in (False, True):
        wanted = [d for d in designs if d.endswith(":shuffled") == shuffled]
        if not wanted:
            continue
        X, Xw, counts, lib, g, xy = features(store, backbone, ctx_backbone, slides, genes, shuffled)
        tr, te = np.isin(g, train), g == test
        truth = log1p_normalise(counts[te], lib[te])
        for design in wanted:
            name = design.split(":")[0]
            F = Xw if name.endswith("+ctx") else X
            if F is None:
                raise SystemExit(f"{design}: needs --context-backbone")
            head = make(name)
            spatial = isinstance(head, ContextNBRegressor)
            kw = {"coords": xy[tr]} if spatial else {}
            t0 = time.perf_counter()
            head.fit(F[tr], counts[tr], groups=g[tr], library_size=lib[tr], **kw)
            fit_s = time.perf_counter() - t0
            rate = head.predict_rate(F[te], groups=g[te], coords=xy[te]) if spatial else head.predict_rate(F[te])
            r = pearson(truth, np.log1p(rate * 1e4))
            out.append(
                {
                    "fold": test,
                    "design": design,
                    "gene": genes,
                    "pcc": r,
                    "fit_s": fit_s,
                    "alpha": getattr(head, "alpha_", float("nan")),
                }
            )
            log.info("%s %s: mean PCC %.4f, fit %.1f s, alpha %s", test, design, np.nanmean(r), fit_s, out[-1]["alpha"])
    return out


def report(dataset: str, rows: list[dict]) -> str:
    designs = list(dict.fromkeys(r["design"] for r in rows))
    folds = list(dict.fromkeys(r["fold"] for r in rows))
    by = {(r["fold"], r["design"]): r for r in rows}
    mean = {d: float(np.mean([np.nanmean(by[f, d]["pcc"]) for f in folds])) for d in designs}
    nb_pairs = np.concatenate([by[f, "nb"]["pcc"] for f in folds]) if "nb" in designs else None
    lines = []
    for d in designs:
        per_fold = [f"{np.nanmean(by[f, d]['pcc']):.3f}" for f in folds]
        fit = [by[f, d]["fit_s"] for f in folds]
        ratio = mean[d] / mean["nb"] if "nb" in mean else float("nan")
        if nb_pairs is not None and d != "nb" and not d.endswith(":shuffled"):
            cmp = compare_pair(np.concatenate([by[f, d]["pcc"] for f in folds]), nb_pairs)
            ci = f"{cmp['diff']:+.4f} [{cmp['ci_low']:+.4f}, {cmp['ci_high']:+.4f}] {cmp['verdict']}"
        else:
            ci = ""
        lines.append((d, *per_fold, f"{mean[d]:.4f}", f"{ratio:.3f}", ci, f"{np.median(fit):.1f}"))
    head = ("design", *folds, "mean PCC", "x nb", "paired diff vs nb [95% CI]", "fit s (median)")
    return f"\n{dataset} (leave-one-slide-out)\n" + table(lines, head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--datasets", default="her2st,stutility_mob")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument(
        "--context-backbone",
        default=None,
        help="comma-separated, e.g. efficientnet_lite0__ctx300um (embed --context-um 300)",
    )
    ap.add_argument("--designs", default="nb,context,context_r1,attention,nb:shuffled,context:shuffled")
    ap.add_argument("--genes", default="var:50")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    store = Store(args.store)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    slides_t = pl.from_arrow(store.read("slides", ["dataset", "slide_id"]))
    for ds in args.datasets.split(","):
        slides = sorted(slides_t.filter(pl.col("dataset") == ds)["slide_id"].to_list())
        rows = []
        for test in slides:
            rows += run_fold(store, args.backbone, args.context_backbone, slides, test, args.genes, designs)
        print(report(ds, rows), flush=True)


if __name__ == "__main__":
    main()
