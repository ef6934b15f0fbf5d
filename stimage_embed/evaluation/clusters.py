"""Leiden clusters of predicted expression profiles (scanpy), for ``infer`` and the ``cluster`` verb.

Profiles (spots x genes: predicted log1p(CP10k), or P(high) for a classifier head) are
z-scored per gene (``sc.pp.scale``), reduced by PCA when there are more genes than
:data:`N_PCS`, linked into a k-nearest-neighbour graph (``sc.pp.neighbors``) and clustered
with ``sc.tl.leiden(flavor="igraph")``; labels are ``"0", "1", ...`` from the largest cluster.
Each cluster's *top genes* are those with the highest mean z-score in the cluster.

Outputs: ``obs['leiden']`` (and ``uns['leiden_top_genes']``) on the AnnData, a cluster map
PNG, and the ``clusters`` table (:data:`stimage_embed.store.schema_explain.CLUSTERS`), which
the viewer and SQL read: ``SELECT leiden, COUNT(*) FROM clusters WHERE run_id = ? GROUP BY 1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
from matplotlib.figure import Figure

from stimage_embed.errors import InputError
from stimage_embed.store.schema_explain import CLUSTERS, CLUSTERS_KEYS
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

N_PCS = 30
N_NEIGHBORS = 15
N_TOP_GENES = 5


def leiden_labels(X: np.ndarray, resolution: float = 1.0, seed: int = 0, n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """Leiden labels (str, ``"0"`` = largest cluster) of the rows of ``X`` (spots x genes), as
    in the module docstring. Constant genes are dropped; fewer than 3 rows -> one cluster."""
    X = np.asarray(X, np.float32)
    keep = np.nanstd(X, axis=0) > 0
    if X.shape[0] < 3 or not keep.any():
        return np.zeros(X.shape[0], dtype=int).astype(str)
    import scanpy as sc

    a = ad.AnnData(np.nan_to_num(X[:, keep]))
    sc.pp.scale(a)
    n_pcs = min(N_PCS, a.n_vars - 1, a.n_obs - 1)
    if a.n_vars > N_PCS and n_pcs >= 2:
        sc.pp.pca(a, n_comps=n_pcs, random_state=seed)
        rep = "X_pca"
    else:
        rep = "X"
    sc.pp.neighbors(a, n_neighbors=max(2, min(n_neighbors, a.n_obs - 1)), use_rep=rep, random_state=seed)
    sc.tl.leiden(a, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return a.obs["leiden"].astype(str).to_numpy()


def top_genes(X: np.ndarray, labels: np.ndarray, genes: list[str], n: int = N_TOP_GENES) -> dict[str, list[str]]:
    """Each cluster's ``n`` genes with the highest mean per-gene z-score in it."""
    X = np.asarray(X, np.float64)
    sd = np.nanstd(X, axis=0)
    z = (X - np.nanmean(X, axis=0)) / np.where(sd > 0, sd, 1.0)
    out = {}
    for c in sorted(set(labels), key=int):
        m = np.nanmean(z[labels == c], axis=0)
        out[c] = [genes[j] for j in np.argsort(-m, kind="stable")[:n]]
    return out


def cluster_map(path: Path, xy: np.ndarray, labels: np.ndarray, tops: dict[str, list[str]], title: str) -> Path:
    """Scatter of spot centres (level-0 px, y down) coloured by cluster, legend with top genes."""
    fig = Figure(figsize=(8.5, 6))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(tops))]
    for i, c in enumerate(sorted(tops, key=int)):
        sel = labels == c
        label = f"{c}: {', '.join(tops[c][:3])} (n={sel.sum()})"
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=colors[i], label=label)
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="Leiden: top predicted genes")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def write_clusters_table(store: Store, run_id: str, slide_ids: list[str], frame: pl.DataFrame) -> None:
    """Make ``frame`` (slide_id, spot_id, leiden, resolution, value) the run's rows for ``slide_ids``."""
    data = frame.with_columns(pl.lit(run_id).alias("run_id"))
    scope = f"run_id = {sql_list([run_id])} AND slide_id IN ({sql_list(slide_ids)})"
    store.replace_where("clusters", data, CLUSTERS_KEYS, scope, CLUSTERS)


def add_leiden(
    adata: ad.AnnData, out_dir: Path, store: Store | None = None, resolution: float = 1.0, seed: int = 0
) -> Path:
    """``infer``'s clusters: Leiden on ``adata.X`` -> ``obs['leiden']``, ``uns['leiden_top_genes']``,
    ``out_dir/leiden.png``, and the ``clusters`` table when ``store`` is given. Returns the PNG."""
    labels = leiden_labels(adata.X, resolution, seed)
    genes = list(map(str, adata.var_names))
    tops = top_genes(adata.X, labels, genes)
    adata.obs["leiden"] = pd.Categorical(labels, categories=sorted(set(labels), key=int))
    adata.uns["leiden_top_genes"] = tops
    info = adata.uns.get("stimage_embed", {})
    slide = str(adata.obs["slide_id"].iloc[0]) if "slide_id" in adata.obs and adata.n_obs else "slide"
    png = cluster_map(out_dir / "leiden.png", adata.obsm["spatial"], labels, tops, f"{slide}: Leiden of predictions")
    if store is not None and info.get("run_id"):
        frame = pl.DataFrame(
            {"slide_id": [slide] * adata.n_obs, "spot_id": list(map(str, adata.obs_names)), "leiden": labels}
        ).with_columns(pl.lit(resolution).alias("resolution"), pl.lit(info.get("X", "mean_log1p")).alias("value"))
        write_clusters_table(store, info["run_id"], [slide], frame)
    return png


@dataclass
class ClusterResult:
    run_id: str
    value: str
    n_spots: int
    sizes: dict[str, int]
    tops: dict[str, list[str]]
    maps: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"run {self.run_id}: {self.n_spots} spots in {len(self.sizes)} Leiden clusters of {self.value}"]
        out += [f"  {c} (n={self.sizes[c]}): {', '.join(self.tops[c])}" for c in sorted(self.sizes, key=int)]
        out += [f"map: {p}" for p in self.maps]
        return out + ["labels written to table clusters"]


def prediction_matrix(
    store: Store, run_id: str, slides: list[str] | None
) -> tuple[pl.DataFrame, list[str], np.ndarray, str]:
    """(keys slide_id/spot_id/pixel_x/pixel_y, genes, spots x genes values, value column) of a run's predictions."""
    if not store.has_table("predictions"):
        raise InputError(None, "--run", f"{store.path}: no predictions table; run `predict` or `infer` first")
    where = f"run_id = {sql_list([run_id])}" + (f" AND slide_id IN ({sql_list(slides)})" if slides else "")
    cols = ["slide_id", "spot_id", "gene", "mean_log1p", "prob_high"]
    pred = pl.from_arrow(store.read("predictions", cols, where=where))
    if pred.height == 0:
        known = store.sql("SELECT DISTINCT run_id FROM predictions ORDER BY 1 LIMIT 5")["run_id"].to_list()
        on = f" on slides {slides}" if slides else ""
        raise InputError(None, "--run", f"no predictions of run {run_id!r}{on}; runs in this store: {known}")
    value = "mean_log1p" if pred["mean_log1p"].null_count() < pred.height else "prob_high"
    wide = pred.pivot(on="gene", index=["slide_id", "spot_id"], values=value).sort("slide_id", "spot_id")
    genes = [c for c in wide.columns if c not in ("slide_id", "spot_id")]
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y"]))
    keys = wide.select("slide_id", "spot_id").join(spots, on=["slide_id", "spot_id"], how="left")
    return keys, genes, wide.select(genes).to_numpy().astype(np.float32), value


def cluster_run(
    store: Store,
    run_id: str,
    slides: list[str] | None = None,
    resolution: float = 1.0,
    seed: int = 0,
    out: Path | None = None,
) -> ClusterResult:
    """The ``cluster`` verb: Leiden over a run's predicted profiles (all its slides together, or
    ``slides``); writes the ``clusters`` table and one map PNG per slide into ``out``."""
    keys, genes, X, value = prediction_matrix(store, run_id, slides)
    labels = leiden_labels(X, resolution, seed)
    tops = top_genes(X, labels, genes)
    frame = keys.select("slide_id", "spot_id").with_columns(
        pl.Series("leiden", labels), pl.lit(resolution).alias("resolution"), pl.lit(value).alias("value")
    )
    slide_ids = sorted(set(keys["slide_id"]))
    with store.writer("cluster"):
        write_clusters_table(store, run_id, slide_ids, frame)
    res = ClusterResult(run_id, value, len(labels), {c: int((labels == c).sum()) for c in tops}, tops)
    if out is not None:
        for sid in slide_ids:
            sel = (keys["slide_id"] == sid).to_numpy()
            xy = keys.filter(pl.Series(sel)).select("pixel_x", "pixel_y").to_numpy()
            png = Path(out) / f"{sid}_leiden.png"
            res.maps.append(cluster_map(png, xy, labels[sel], tops, f"{sid}: Leiden of run {run_id[:10]}"))
    return res
