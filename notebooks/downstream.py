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
# # From predicted expression to patients: survival, treatment response, pseudo-bulk agreement
#
# STimage's clinical claim is that expression predicted from H&E stratifies survival and
# predicts treatment response. This notebook runs that last step of the data flow with
# `stimage_embed.downstream` (the `clinical add`, `survival` and `response` commands):
#
# 1. **Measured arm, real cohort**: GSE7390 (scikit-survival's `load_breast_cancer`: 198
#    patients, 76 genes, distant-metastasis-free survival, ER status). Univariate Cox per
#    gene with its c-index, a top-5 multivariate Cox scored by 3-fold CV repeated, median
#    risk groups with Kaplan-Meier curves and the log-rank p; an RBF-SVM predicting ER status
#    with nested CV.
# 2. **Predicted arm, SYNTHETIC outcomes**: crops of the real HER2ST images become slides
#    without counts; `infer` writes their predicted pseudo-bulk; a clinical table we
#    *generate* (random times, events, responses; flagged `synthetic = 1`) is joined to them.
#    There is no H&E cohort with outcomes here: these numbers only show what the pipeline
#    computes and carry **no clinical meaning**.
# 3. **Pseudo-bulk agreement** on real sections with counts, leave-one-slide-out: Pearson r
#    between predicted and measured pseudo-bulk across genes within each slide.
#
# | variable | meaning | default |
# |---|---|---|
# | `STIMAGE_NOTEBOOK_STORE` | a store: HER2ST ingested, the model's vectors | new: HER2ST, C4/C5 embedded |
# | `STIMAGE_NOTEBOOK_MODEL` | run id of a saved model in that store | a `ridge` model on C4 (`var:20`) |
# | `STIMAGE_NOTEBOOK_OUT` | output folder | `reports/downstream` |
# | `STIMAGE_NOTEBOOK_REPEATS` | repeats of the multivariate Cox CV | `100` |
# | `STIMAGE_NOTEBOOK_WORKERS` | DataLoader workers of the embedding pass | `1` |

# %% tags=["parameters"]
import os
from pathlib import Path

STORE = os.environ.get("STIMAGE_NOTEBOOK_STORE")
MODEL = os.environ.get("STIMAGE_NOTEBOOK_MODEL")
OUT = Path(os.environ.get("STIMAGE_NOTEBOOK_OUT", "reports/downstream"))
REPEATS = int(os.environ.get("STIMAGE_NOTEBOOK_REPEATS", "100"))
NUM_WORKERS = int(os.environ.get("STIMAGE_NOTEBOOK_WORKERS", "1"))

# %%
import json
import logging
import tempfile

import imagecodecs
import numpy as np
import polars as pl
from IPython.display import Image, Markdown, display
from sksurv.datasets import load_breast_cancer

from stimage_embed import (
    SYNTHETIC_NOTE,
    CompareConfig,
    Store,
    add_clinical,
    agreement_summary,
    compare,
    data_root,
    embed,
    infer,
    ingest,
    pseudobulk_agreement,
    run_response,
    run_survival,
    train,
)

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
pl.Config.set_tbl_rows(30)
pl.Config.set_tbl_cols(-1)
pl.Config.set_tbl_width_chars(200)
pl.Config.set_float_precision(4)
pl.Config.set_tbl_hide_dataframe_shape(True)
OUT.mkdir(parents=True, exist_ok=True)
summary = {}

# %% [markdown]
# ## 1. Measured arm: GSE7390 (real)
#
# The cohort's expression goes in as a patient x gene parquet (`--expr FILE`), its outcomes
# as the store's `clinical` table (`clinical add`, keyed by patient).

# %%
x, y = load_breast_cancer()
genes = [c for c in x.columns if c.startswith("X")]
ids = [f"GSE7390_{i:03d}" for i in range(len(x))]
expr_file = OUT / "gse7390_expression.parquet"
pl.DataFrame({"patient": ids, **{g: x[g].to_numpy() for g in genes}}).write_parquet(expr_file)
clin_file = OUT / "gse7390_clinical.csv"
pl.DataFrame(
    {
        "patient": ids,
        "dmfs_time": y["t.tdm"],
        "dmfs_event": y["e.tdm"].astype(int),
        "er": x["er"].astype(str).tolist(),
        "grade": x["grade"].astype(str).tolist(),
    }
).write_csv(clin_file)
gse_store = Store(OUT / "gse7390_store")
print(*add_clinical(gse_store, clin_file, "patient").lines(), sep="\n")

# %% tags=["gse_survival"]
gse_out = OUT / "gse7390_survival"
res, gse_summary = run_survival(
    gse_store, str(expr_file), "dmfs_time", "dmfs_event", top=len(genes), by="er", out=gse_out, n_repeats=REPEATS
)
display(res.univariate.head(10))
display(res.multivariate.select("gene", "hazard_ratio", "p", "c_index_mean", "ci_low", "ci_high"))
print(f"log-rank high vs low risk: statistic {res.logrank['statistic']:.3f}, p {res.logrank['p']:.3g}")
display(Image(filename=str(gse_out / "km_risk_groups.png")))
summary["gse7390_survival"] = gse_summary

# %% tags=["gse_response"]
resp, resp_summary = run_response(
    gse_store, str(expr_file), "er", top=len(genes), positive="positive", out=OUT / "gse7390_response"
)
display(resp.folds)
print(f"ER status from the 76 genes, nested CV AUC {resp.auc_mean:.3f} ± {resp.auc_sd:.3f}")
display(Image(filename=str(OUT / "gse7390_response" / "roc.png")))
summary["gse7390_response"] = resp_summary

# %% [markdown]
# ## 2. Predicted arm: real images, SYNTHETIC outcomes
#
# The store holding the model's training vectors (`infer` reproduces their provenance).
# Without `STIMAGE_NOTEBOOK_STORE`/`MODEL` this cell builds one: HER2ST ingested, C4 and C5
# embedded with EfficientNet-Lite0, a ridge head trained on C4 for 20 genes.

# %%
if STORE is None:
    STORE = str(Path(tempfile.mkdtemp(prefix="stimage_downstream_")) / "store")
store = Store(STORE)
if MODEL is None:
    if not store.has_table("slides"):
        ingest("her2st", store, data_root=data_root(), progress=False)
    embed(store, ["efficientnet_lite0"], slides=["C4", "C5"], precision="float32", num_workers=NUM_WORKERS)
    MODEL, _ = train(store, "efficientnet_lite0", "ridge", "var:20", ["C4"])
print("model", MODEL)

# %% [markdown]
# Eight slides without counts: 1.2 x 1.2 mm crops from the middle of four real sections the
# model did not train on (B4, C2, C3, C5), two each, predicted by `infer` on a 200 µm grid.
# Each crop is one clinical unit (`key = slide_id`).

# %%
crops = OUT / "crops"
crops.mkdir(exist_ok=True)
units = []
for section in ("B4", "C2", "C3", "C5"):
    spots = store.sql(f"SELECT pixel_x, pixel_y FROM spots WHERE slide_id = '{section}' AND passes_qc")
    um_per_px = store.sql(f"SELECT um_per_px FROM slides WHERE slide_id = '{section}'")["um_per_px"][0]
    image = imagecodecs.imread(str(data_root() / "her2st" / "images" / f"{section}.jpg"))
    side = int(1200 / um_per_px)
    cx, cy = int(spots["pixel_x"].median()), int(spots["pixel_y"].median())
    for k, dx in enumerate((-side, 0)):
        crop = np.ascontiguousarray(image[cy - side // 2 : cy + side // 2, cx + dx : cx + dx + side])
        path = crops / f"{section}_crop{k}.jpg"
        path.write_bytes(imagecodecs.jpeg8_encode(crop, level=90))
        sid = f"{section}_crop{k}"
        infer(
            store, path, MODEL, OUT / "infer", slide_id=sid, um_per_px=um_per_px, pitch_um=200,
            n_top_genes=0, num_workers=0, device="cpu",
        )  # fmt: skip
        units.append(sid)
pseudobulk = store.sql(
    f"SELECT slide_id, COUNT(*) AS genes, MAX(n_tiles) AS tiles FROM pseudobulk "
    f"WHERE run_id = '{MODEL}' GROUP BY slide_id ORDER BY slide_id"
)
display(pseudobulk)

# %% [markdown]
# **SYNTHETIC clinical table** (seeded random numbers; `synthetic = 1` on every row, so every
# figure and summary below is marked SYNTHETIC).

# %% tags=["synthetic_clinical"]
rng = np.random.default_rng(0)
synthetic = pl.DataFrame(
    {
        "slide_id": units,
        "time": rng.exponential(60.0, len(units)).round(1),
        "event": np.tile([1, 1, 1, 0], len(units) // 4),
        "response": np.tile(["pCR", "RD"], len(units) // 2),
        "synthetic": [1] * len(units),
    }
)
synthetic.write_csv(OUT / "SYNTHETIC_clinical.csv")
print(*add_clinical(store, OUT / "SYNTHETIC_clinical.csv", "slide_id").lines(), sep="\n")
display(Markdown(f"**{SYNTHETIC_NOTE}**"))
display(synthetic)

# %% tags=["synthetic_survival"]
syn_out = OUT / "SYNTHETIC_survival"
syn, syn_summary = run_survival(
    store, "predicted", "time", "event", key="slide_id", runs=[MODEL], top=20, out=syn_out,
    n_multi=2, n_folds=2, n_repeats=REPEATS, penalizer=0.1,
)  # fmt: skip
display(Markdown(f"**{SYNTHETIC_NOTE}**"))
display(syn.univariate.head(5))
display(syn.multivariate.select("gene", "hazard_ratio", "c_index_mean", "ci_low", "ci_high"))
print(f"SYNTHETIC log-rank p {syn.logrank['p']:.3g} (random outcomes: no meaning)")
summary["synthetic_survival"] = syn_summary

# %% tags=["synthetic_response"]
syn_resp, syn_resp_summary = run_response(
    store, "predicted", "response", key="slide_id", runs=[MODEL], top=20, positive="pCR", n_outer=2, n_inner=2
)
display(Markdown(f"**{SYNTHETIC_NOTE}**"))
display(syn_resp.folds)
summary["synthetic_response"] = syn_resp_summary

# %% [markdown]
# The clinical table is a store table like the others: SQL joins it to the pseudo-bulk.

# %% tags=["sql_join"]
joined = store.sql(
    """SELECT c.key AS slide_id, c.time, c.event, c.synthetic, p.gene, p.n_tiles, p.mean_cp10k
       FROM clinical c JOIN pseudobulk p ON p.slide_id = c.slide_id
       WHERE c.key_kind = 'slide_id' ORDER BY slide_id, gene LIMIT 6"""
)
display(joined)

# %% [markdown]
# ## 3. Pseudo-bulk agreement on real sections with counts (leave-one-slide-out)
#
# `compare` trains on all but one section and predicts the held-out one; its report gets
# the same table. Read the ridge head next to the `mean` baseline: a per-gene mean already
# gets the genes' overall levels right.

# %% tags=["agreement"]
result = compare(
    store,
    CompareConfig(backbones=["efficientnet_lite0"], heads=["ridge", "mean"], genes="var:20", datasets=["her2st"]),
    progress=False,
)
run_list = ", ".join(f"'{r}'" for r in result.run_ids)
runs = store.sql(f"SELECT * FROM runs WHERE run_id IN ({run_list})")
predictions = store.sql(f"SELECT * FROM predictions WHERE run_id IN ({run_list})")
per_slide, per_gene = pseudobulk_agreement(predictions, runs)
display(per_slide)
display(agreement_summary(per_slide, per_gene))
summary["agreement"] = per_slide.to_dicts()

# %%
(OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
print("wrote", OUT / "summary.json")
