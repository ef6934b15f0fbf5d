# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Predicting spatial expression on a slide that has only an image
#
# STimage's main use: apply a model trained on spatial transcriptomics to routine H&E
# slides that were never sequenced (TCGA whole-slide images, a clinical archive), and map
# the predicted expression over the tissue. This notebook does that with
# `stimage_embed.inference.infer` (the `stimage-embed infer` command):
#
# 1. **a model**: a head trained on cached spot vectors of sequenced slides (`train`);
# 2. **the new image becomes a slide without counts**: tissue is detected on a thumbnail
#    and a grid of tiles is laid over it, each tile as wide as the model's training tiles;
# 3. **embedding** with the model's backbone *and* its vector provenance (same stain
#    normalisation target, tile width, weights, precision), so the vectors are comparable
#    with the training vectors; tiles are cut on demand, never the whole slide at once;
# 4. **predictions** for every gene of the model, then an AnnData for scanpy/squidpy,
#    heatmaps over the tissue and a pseudo-bulk (mean predicted expression per gene).
#
# By default the "new" image is HER2ST section C5's JPEG: it *was* sequenced, so step 8
# can compare the pseudo-bulk with C5's measured bulk expression. Environment variables,
# all optional:
#
# | variable | meaning | default |
# |---|---|---|
# | `STIMAGE_NOTEBOOK_STORE` | store holding the model's training vectors | new: HER2ST ingested, B4/C2/C3/C4 embedded |
# | `STIMAGE_NOTEBOOK_MODEL` | run id of a saved model in that store | `nb` on B4, C2, C3, C4 (`var:20`) |
# | `STIMAGE_NOTEBOOK_IMAGE` | the image to predict (WSI, pyramidal TIFF, JPEG, PNG) | `her2st/images/C5.jpg` |
# | `STIMAGE_NOTEBOOK_UM_PER_PX` | µm per pixel (JPEG/PNG need it; WSIs carry it) | C5's value in the store |
# | `STIMAGE_NOTEBOOK_SLIDE_ID` | id of the new slide | `C5_image` |
# | `STIMAGE_NOTEBOOK_PITCH_UM` | grid pitch, µm | the model's tile width |
# | `STIMAGE_NOTEBOOK_BULK_SLIDE` | a sequenced slide of the same tissue, for the bulk comparison | `C5` for C5.jpg |
# | `STIMAGE_NOTEBOOK_OUT` | output folder | `reports/infer_new_slide` |
# | `STIMAGE_NOTEBOOK_WORKERS` | DataLoader workers of the embedding pass | `1` |
# | `STIMAGE_DATA_ROOT` | folder holding `her2st/` | `../shared/data` |

# %% [markdown]
# ## 1. Parameters

# %% tags=["parameters"]
import os
from pathlib import Path

STORE = os.environ.get("STIMAGE_NOTEBOOK_STORE")
MODEL = os.environ.get("STIMAGE_NOTEBOOK_MODEL")
IMAGE = os.environ.get("STIMAGE_NOTEBOOK_IMAGE")
UM_PER_PX = os.environ.get("STIMAGE_NOTEBOOK_UM_PER_PX")
SLIDE_ID = os.environ.get("STIMAGE_NOTEBOOK_SLIDE_ID", "C5_image")
PITCH_UM = os.environ.get("STIMAGE_NOTEBOOK_PITCH_UM")
BULK_SLIDE = os.environ.get("STIMAGE_NOTEBOOK_BULK_SLIDE")
OUT = Path(os.environ.get("STIMAGE_NOTEBOOK_OUT", "reports/infer_new_slide"))
NUM_WORKERS = int(os.environ.get("STIMAGE_NOTEBOOK_WORKERS", "1"))
TRAIN_SLIDES = ["B4", "C2", "C3", "C4"]  # used only when no MODEL is given

# %%
import importlib.util
import io
import json
import logging
import tempfile

import anndata as ad
import numpy as np
import polars as pl
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure
from scipy import stats

from stimage_embed import Store, data_root, embed, infer, ingest, train

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
pl.Config.set_tbl_rows(40)
pl.Config.set_tbl_cols(-1)
pl.Config.set_fmt_str_lengths(60)
pl.Config.set_tbl_width_chars(220)
pl.Config.set_float_precision(3)
pl.Config.set_tbl_hide_dataframe_shape(True)

IMAGE = Path(IMAGE) if IMAGE else data_root() / "her2st" / "images" / "C5.jpg"
if BULK_SLIDE is None and IMAGE.name == "C5.jpg":
    BULK_SLIDE = "C5"
print("image:", IMAGE, "| new slide id:", SLIDE_ID, "| output:", OUT)


def show(fig) -> None:
    """Display a matplotlib figure inline as a PNG."""
    png = io.BytesIO()
    fig.savefig(png, format="png", facecolor="white")
    display(Image(data=png.getvalue()))


# %% [markdown]
# ## 2. The store and the model
#
# A model can only be applied to vectors made the way its training vectors were made,
# so `infer` needs the store the model was trained in: it reads the provenance of the
# training vectors there and refits the stain target from the same template slide.
# Without `STIMAGE_NOTEBOOK_STORE`/`MODEL` this cell builds both (≈ 5 min on 2 CPU cores):
# HER2ST is ingested, four sections embedded with EfficientNet-Lite0, and a negative-binomial
# head (`nb`, STimage's model) is trained on them for the 20 genes with the highest
# variance of log1p(CP10k) across the training spots.

# %%
if STORE is None:
    STORE = str(Path(tempfile.mkdtemp(prefix="stimage_infer_")) / "store")
store = Store(STORE)
if MODEL is None:
    if not store.has_table("slides"):
        ingest("her2st", store, data_root=data_root(), progress=False)
    embed(
        store, ["efficientnet_lite0"], slides=TRAIN_SLIDES, precision="float32", num_workers=NUM_WORKERS, progress=False
    )
    MODEL, _ = train(store, "efficientnet_lite0", "nb", "var:20", TRAIN_SLIDES)
run = json.loads((store.path / "models" / MODEL / "run.json").read_text())
print(
    f"model {MODEL}: head {run['head']} on {run['backbone']}, trained on {run['train_slides']} "
    f"({run['n_train_spots']} spots), {len(run['genes'])} genes"
)
print("genes:", ", ".join(run["genes"]))

# %% [markdown]
# **The provenance the new slide's vectors must reproduce**: the backbone's spec hash and
# weights (sha256), tile width (µm) and input size (px), the stain normalisation method and
# its template slide, the numeric precision. If any of these cannot be reproduced here
# (weights missing, template slide gone), `infer` refuses with a one-line error before
# writing anything.

# %%
display(
    store.sql(
        f"""
    SELECT p.provenance_id, p.backbone, left(p.weights_sha256, 16) AS weights_sha256,
           json_extract_string(p.json, '$.tile_um') AS tile_um, p.tile_px, p.stain_method, p.stain_template,
           json_extract_string(p.json, '$.precision') AS precision
    FROM provenance p
    WHERE p.provenance_id IN (SELECT DISTINCT provenance_id FROM embeddings_{run["backbone"]}
                              WHERE slide_id IN ({", ".join(f"'{s}'" for s in run["train_slides"])}))
    """
    )
)

# %% [markdown]
# ## 3. Infer
#
# A JPEG has no pixel size in its metadata, so µm/px must be given (for C5.jpg it is taken
# from the ingested C5, ≈ 0.69 µm/px; a whole-slide file carries its own). Tiles are
# `tile_um` wide (100 µm here: the spot diameter the model was trained on) on a grid with
# `PITCH_UM` between centres (default: the tile width, so tiles touch). Grid tiles whose
# disk is at least 10 % tissue are kept; ≥ 70 % tissue passes QC (as `ingest` flags spots)
# and counts in the pseudo-bulk. Re-running the cell reuses the cached vectors.

# %%
if UM_PER_PX is None and IMAGE.suffix.lower() in (".jpg", ".jpeg", ".png") and BULK_SLIDE is not None:
    UM_PER_PX = store.sql(f"SELECT um_per_px FROM slides WHERE slide_id = '{BULK_SLIDE}'")["um_per_px"][0]
result = infer(
    store,
    IMAGE,
    MODEL,
    OUT,
    slide_id=SLIDE_ID,
    um_per_px=float(UM_PER_PX) if UM_PER_PX is not None else None,
    pitch_um=float(PITCH_UM) if PITCH_UM else None,
    num_workers=NUM_WORKERS,
)
print("\n".join(result.lines()))

# %% [markdown]
# ## 4. The new slide in the store
#
# It is a slide like any other (`slides`, `spots`, vectors in `embeddings_<backbone>`,
# rows in `predictions`), with platform `image_only` and no counts: no `genes` or
# `expression` rows. One row per grid tile in `spots`: grid row/column, centre in
# full-resolution pixels, tissue fraction and QC flag.

# %%
display(
    store.sql(
        f"""
    SELECT slide_id, platform, image_width, image_height, round(um_per_px, 4) AS um_per_px, um_per_px_source,
           spot_diameter_um AS tile_um, spot_pitch_um AS pitch_um, n_spots AS tiles, n_spots_pass_qc AS tiles_pass_qc,
           n_genes, round(tissue_area_fraction, 3) AS tissue_area_fraction
    FROM slides WHERE slide_id = '{SLIDE_ID}'
    """
    )
)
display(
    store.sql(
        f"""
    SELECT gene, COUNT(*) AS tiles, round(avg(mean_log1p), 3) AS mean_log1p,
           round(min(mean_log1p), 3) AS min_log1p, round(max(mean_log1p), 3) AS max_log1p
    FROM predictions WHERE run_id = '{MODEL}' AND slide_id = '{SLIDE_ID}'
    GROUP BY gene ORDER BY max_log1p - min_log1p DESC
    """
    )
)

# %% [markdown]
# ## 5. Heatmaps
#
# One PNG per gene in `OUT/<slide>/`: the genes whose predictions vary most across the
# tissue (plus any asked for with `--genes`). Each tile is coloured by its predicted
# log1p(CP10k) over the thumbnail; the colour bar gives the scale (2nd to 98th percentile
# of the tiles) and the bar at the bottom right a physical length.

# %% tags=["heatmaps"]
for gene, path in list(result.heatmaps.items())[:3]:
    display(Markdown(f"**{gene}** — `{path}`"))
    display(Image(filename=str(path), width=560))

# %% [markdown]
# ## 6. AnnData for scanpy and squidpy
#
# `OUT/<slide>.h5ad`: `X` holds the predicted log1p(CP10k) (tiles × genes), `layers` the
# uncertainty terms the head provides (predictive variance and quantiles for NB heads, on
# the count scale at the training reference depth), `obs` the tile keys, tissue fraction and
# QC flag, `obsm['spatial']` the tile centres in full-resolution pixels, and
# `uns['spatial'][slide]` the thumbnail (`hires`) with its scale factors, the layout
# `scanpy.pl.spatial` and `squidpy` read for Visium.

# %%
adata = ad.read_h5ad(result.anndata)
print(adata)
sf = adata.uns["spatial"][SLIDE_ID]["scalefactors"]
print({k: round(float(v), 5) for k, v in sf.items()})

# %% [markdown]
# The same map drawn by scanpy (if installed) straight from the AnnData: one circle per
# tile, the circle as wide as the tile (`spot_diameter_fullres`).

# %%
top_gene = next(iter(result.heatmaps))
if importlib.util.find_spec("scanpy") is not None:
    import matplotlib.pyplot as plt
    import scanpy as sc

    axes = sc.pl.spatial(adata, color=top_gene, show=False, title=f"{top_gene} (scanpy)")
    fig = (axes[0] if isinstance(axes, list) else axes).figure
    show(fig)
    plt.close(fig)  # scanpy draws with pyplot; shown once, above
else:
    print("scanpy is not installed; `pip install scanpy` to draw with sc.pl.spatial")

# %% [markdown]
# **Uncertainty.** For an NB head, the predictive standard deviation (count scale) of the
# most variable gene against its predicted level: tiles the model is unsure about stand
# out above the trend. Ridge and mean heads give no uncertainty.

# %%
if "variance" in adata.layers:
    j = list(adata.var_names).index(top_gene)
    fig = Figure(figsize=(5, 3.5), layout="constrained", dpi=100)
    ax = fig.add_subplot()
    ax.scatter(adata.X[:, j], np.sqrt(adata.layers["variance"][:, j]), s=4, alpha=0.5)
    ax.set_xlabel(f"{top_gene}: predicted log1p(CP10k)")
    ax.set_ylabel("predictive s.d. (counts)")
    show(fig)
else:
    print(f"head {result.head!r} gives point predictions only (layers: {list(adata.layers)})")

# %% [markdown]
# ## 7. Pseudo-bulk
#
# The mean predicted expression per gene over the tiles that pass tissue QC: `mean_log1p`
# (log1p(CP10k)) and `mean_cp10k` (counts per 10⁴, the linear scale of bulk CPM / 100). It is
# written to `OUT/<slide>_pseudobulk.csv` and to the store table `pseudobulk`.

# %% tags=["pseudobulk"]
pb = pl.read_csv(result.pseudobulk_csv) if result.pseudobulk_csv else None
display(pb.sort("mean_cp10k", descending=True) if pb is not None else Markdown("classifier head: no pseudo-bulk"))
display(
    store.sql(
        f"SELECT COUNT(*) AS genes, any_value(n_tiles) AS tiles FROM pseudobulk "
        f"WHERE run_id = '{MODEL}' AND slide_id = '{SLIDE_ID}'"
    )
)

# %% [markdown]
# ## 8. Against measured bulk expression
#
# C5 was sequenced, so its total counts per gene over all spots act as a bulk RNA
# measurement of the section: `bulk_cp10k` = gene total / all counts × 10⁴. Across genes,
# Pearson r on the log1p scale says whether the pseudo-bulk ranks the genes' levels like
# the measurement (largely the genes' typical levels, which the model learnt from the
# training slides); the spatial maps above are what a bulk measurement cannot give.

# %%
bulk_r = None
if BULK_SLIDE is not None and pb is not None:
    genes_sql = ", ".join(f"'{g}'" for g in pb["gene"])
    bulk = store.sql(
        f"""
        WITH t AS (SELECT SUM(count) AS total FROM expression_long WHERE slide_id = '{BULK_SLIDE}')
        SELECT e.gene, SUM(e.count) / any_value(t.total) * 1e4 AS bulk_cp10k
        FROM expression_long e, t WHERE e.slide_id = '{BULK_SLIDE}' AND e.gene IN ({genes_sql})
        GROUP BY e.gene
        """
    )
    cmp = (
        pb.select("gene", "mean_cp10k")
        .join(bulk, on="gene", how="left")
        .with_columns(pl.col("bulk_cp10k").fill_null(0.0))
    )
    bulk_r = float(stats.pearsonr(np.log1p(cmp["mean_cp10k"]), np.log1p(cmp["bulk_cp10k"]))[0])
    display(cmp.sort("bulk_cp10k", descending=True))
    fig = Figure(figsize=(4.5, 4), layout="constrained", dpi=100)
    ax = fig.add_subplot()
    ax.scatter(np.log1p(cmp["bulk_cp10k"]), np.log1p(cmp["mean_cp10k"]))
    ax.set_xlabel(f"{BULK_SLIDE} measured: log1p(bulk CP10k)")
    ax.set_ylabel(f"{SLIDE_ID} pseudo-bulk: log1p(mean CP10k)")
    ax.set_title(f"Pearson r = {bulk_r:.2f} over {cmp.height} genes")
    show(fig)
else:
    print("no sequenced slide given for a bulk comparison (STIMAGE_NOTEBOOK_BULK_SLIDE)")

# %% [markdown]
# ## 9. Summary
#
# Written to `OUT/summary.json` for scripts (and the tests).

# %%
summary = {
    "slide_id": result.slide_id,
    "run_id": result.run_id,
    "head": result.head,
    "backbone": result.backbone,
    "tiles": result.n_tiles,
    "tiles_pass_qc": result.n_pass_qc,
    "tile_um": result.tile_um,
    "pitch_um": result.pitch_um,
    "um_per_px": result.um_per_px,
    "prediction_rows": result.prediction_rows,
    "genes": list(adata.var_names),
    "heatmaps": {g: str(p) for g, p in result.heatmaps.items()},
    "anndata": str(result.anndata),
    "pseudobulk_csv": str(result.pseudobulk_csv) if result.pseudobulk_csv else None,
    "bulk_slide": BULK_SLIDE,
    "pseudobulk_vs_bulk_r": bulk_r,
}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k not in ("genes", "heatmaps")}, indent=2))
