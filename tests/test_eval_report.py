"""The ``compare`` report writer on synthetic but realistic tables: 2 backbones x 4 heads
(mean, ridge, nb, ensemble), leave-one-slide-out over 2 slides of 10x10 spots, 5 genes.

Counts are negative-binomial around a smooth spatial pattern per gene; heads predict the
pattern with a planted, gene-specific noise level, so ``KRT19`` is the most predictable gene
and ``ensemble`` on ``bbA`` the best model. Metrics and the leaderboard are computed here
with scipy / numpy, independently of the report code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy import stats

from stimage_embed.errors import InputError
from stimage_embed.evaluation.report import best_models, gene_scores, top_genes, write_report
from stimage_embed.evaluation.spatial import grid_layout as infer_layout

GENES = ["ERBB2", "KRT19", "CD74", "MGP", "ACTB"]
#: noise sd (log scale) of the prediction of each gene; KRT19 is planted as the easiest
GENE_NOISE = {"ERBB2": 0.45, "KRT19": 0.08, "CD74": 0.7, "MGP": 1.0, "ACTB": 1.5}
HEAD_NOISE = {"ensemble": 1.0, "nb": 1.3, "ridge": 2.0}
BACKBONE_NOISE = {"bbA": 1.0, "bbB": 1.4}
SLIDES = ["S1", "S2"]
THETA = 8.0  # NB dispersion of the synthetic counts


def _spots() -> pl.DataFrame:
    rows = []
    rng = np.random.default_rng(1)
    for s in SLIDES:
        for r in range(10):
            for c in range(10):
                rows.append(
                    {
                        "slide_id": s,
                        "spot_id": f"{c}x{r}",
                        "array_row": r,
                        "array_col": c,
                        "pixel_x": 300.0 + 95.0 * c + rng.normal(0, 2),
                        "pixel_y": 250.0 + 95.0 * r + rng.normal(0, 2),
                    }
                )
    return pl.DataFrame(rows).with_columns(pl.col("array_row", "array_col").cast(pl.Int32))


def _pattern(slide_i: int, g: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Smooth log-scale pattern of gene g: a Gaussian blob whose centre moves by gene/slide."""
    cr, cc = 2 + (3 * g + slide_i) % 6, 7 - (2 * g + 3 * slide_i) % 6
    return 1.6 * np.exp(-((r - cr) ** 2 + (c - cc) ** 2) / (2 * 2.5**2)) - 0.5


@pytest.fixture(scope="module")
def tables() -> dict[str, pl.DataFrame]:
    rng = np.random.default_rng(7)
    spots = _spots()
    base = np.array([2e-3, 5e-3, 1e-3, 3e-3, 8e-3])  # fraction of the library per gene
    truth = {}
    for si, s in enumerate(SLIDES):
        sp = spots.filter(pl.col("slide_id") == s)
        r, c = sp["array_row"].to_numpy(), sp["array_col"].to_numpy()
        lib = rng.uniform(2000, 6000, r.size)
        pat = np.stack([_pattern(si, g, r, c) for g in range(len(GENES))], axis=1)
        mu = lib[:, None] * base[None, :] * np.exp(pat)
        obs = rng.negative_binomial(THETA, THETA / (THETA + mu))
        truth[s] = (sp["spot_id"].to_list(), lib, pat, obs)

    runs, preds, mets = [], [], []
    for bb in ("bbA", "bbB"):
        for head in ("mean", "ridge", "nb", "ensemble"):
            for fi, test in enumerate(SLIDES):
                run_id = f"{bb}-{head}-f{fi}"
                runs.append(
                    {
                        "run_id": run_id,
                        "dataset": "synth",
                        "backbone": bb,
                        "members": [bb],
                        "head": head,
                        "split": "loso",
                        "fold": f"loso:{test}",
                        "train_slides": [s for s in SLIDES if s != test],
                        "test_slides": [test],
                        "genes": GENES,
                    }
                )
                spot_ids, lib, pat, obs = truth[test]
                n = lib.size
                if head == "mean":
                    mean = np.broadcast_to(lib[:, None] * base[None, :] * np.exp(pat.mean(axis=0)), pat.shape).copy()
                else:
                    sd = np.array([GENE_NOISE[g] for g in GENES]) * HEAD_NOISE[head] * BACKBONE_NOISE[bb]
                    mean = lib[:, None] * base[None, :] * np.exp(pat + rng.normal(0, 1, pat.shape) * sd[None, :])
                lib32 = lib.astype(np.float32).astype(np.float64)
                yh = np.log1p(mean / lib[:, None] * 1e4).astype(np.float32).astype(np.float64)
                if head == "mean":  # exactly constant per gene, as a fitted mean baseline
                    yh = np.broadcast_to(yh[:1], yh.shape).copy()
                var = mean + mean**2 / THETA
                has_q = head in ("nb", "ensemble")
                p = THETA / (THETA + mean)
                q = (
                    {
                        k: stats.nbinom.ppf(v, THETA, p)
                        for k, v in {"q05": 0.05, "q25": 0.25, "q75": 0.75, "q95": 0.95}.items()
                    }
                    if has_q
                    else {}
                )
                epi = 0.1 * mean**2 / THETA if head == "ensemble" else None
                frame = {
                    "run_id": run_id,
                    "slide_id": test,
                    "spot_id": np.repeat(spot_ids, len(GENES)),
                    "gene": np.tile(GENES, n),
                    "mean": mean.ravel(),
                    "mean_log1p": yh.ravel(),
                    "variance": var.ravel() if has_q else None,
                    "epistemic": epi.ravel() if epi is not None else None,
                    "aleatoric": (var - epi).ravel() if epi is not None else None,
                    **{k: (q[k].ravel() if has_q else None) for k in ("q05", "q25", "q75", "q95")},
                    "prob_high": None,
                    "observed": obs.ravel(),
                    "library_size": np.repeat(lib, len(GENES)),
                }
                preds.append(
                    pl.DataFrame(frame).with_columns(
                        pl.col(
                            "mean",
                            "mean_log1p",
                            "variance",
                            "epistemic",
                            "aleatoric",
                            "q05",
                            "q25",
                            "q75",
                            "q95",
                            "prob_high",
                            "library_size",
                        ).cast(pl.Float32),
                        pl.col("observed").cast(pl.Int32),
                    )
                )
                y = np.log1p(obs / lib32[:, None] * 1e4)  # the stored (float32) library size
                for g, gene in enumerate(GENES):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", stats.ConstantInputWarning)
                        r_ = float(stats.pearsonr(y[:, g], yh[:, g]).statistic)
                    vals = {"pearson": r_, "mse": float(np.mean((y[:, g] - yh[:, g]) ** 2))}
                    if has_q:
                        vals["coverage_50"] = float(
                            np.mean((obs[:, g] >= q["q25"][:, g]) & (obs[:, g] <= q["q75"][:, g]))
                        )
                        vals["coverage_90"] = float(
                            np.mean((obs[:, g] >= q["q05"][:, g]) & (obs[:, g] <= q["q95"][:, g]))
                        )
                    # pooled rows carry decoy Pearson values: ranking must use per-slide rows only
                    decoy = {**vals, "pearson": {"KRT19": -0.5, "ACTB": 0.99}.get(gene, r_)}
                    for scope, sid, vv in (("slide", test, vals), ("pooled", "", decoy)):
                        for m, v in vv.items():
                            mets.append(
                                {
                                    "run_id": run_id,
                                    "dataset": "synth",
                                    "backbone": bb,
                                    "head": head,
                                    "fold": f"loso:{test}",
                                    "scope": scope,
                                    "slide_id": sid,
                                    "gene": gene,
                                    "metric": m,
                                    "value": v,
                                }
                            )
    metrics = pl.DataFrame(mets)
    slide = metrics.filter(pl.col("scope") == "slide").with_columns(pl.col("value").fill_nan(None))
    leaderboard = (
        slide.group_by("backbone", "head")
        .agg(
            pl.col("value").filter(pl.col("metric") == "pearson").mean().alias("pearson_mean"),
            pl.col("value").filter(pl.col("metric") == "mse").mean().alias("mse_mean"),
            pl.col("gene").n_unique().alias("n_genes"),
        )
        .sort("pearson_mean", descending=True, nulls_last=True)
    )
    return {
        "metrics": metrics,
        "predictions": pl.concat(preds, how="vertical_relaxed"),
        "runs": pl.DataFrame(runs),
        "spots": spots,
        "leaderboard": leaderboard,
    }


@pytest.fixture(scope="module")
def report(tables, tmp_path_factory) -> Path:
    return write_report(
        tmp_path_factory.mktemp("report"),
        tables["metrics"],
        tables["predictions"],
        tables["runs"],
        tables["spots"],
        tables["leaderboard"],
        top_k_genes=3,
    )


def _expected_pearson(tables) -> dict[tuple[str, str, str], list[float]]:
    """Per-slide Pearson recomputed from the predictions with scipy, by (backbone, head, gene)."""
    out: dict[tuple[str, str, str], list[float]] = {}
    p = tables["predictions"].join(tables["runs"].select("run_id", "backbone", "head"), on="run_id")
    for (bb, head, _slide, gene), sub in p.group_by("backbone", "head", "slide_id", "gene"):
        y = np.log1p(sub["observed"].to_numpy() / sub["library_size"].to_numpy().astype(np.float64) * 1e4)
        yh = sub["mean_log1p"].to_numpy().astype(np.float64)
        if np.ptp(yh) > 1e-6:
            out.setdefault((bb, head, gene), []).append(float(stats.pearsonr(y, yh).statistic))
    return out


def test_top_gene_and_best_model(tables):
    best = best_models(tables["metrics"])
    assert best.select("backbone", "head").rows() == [("bbA", "ensemble")]
    tg = top_genes(tables["metrics"], 3).filter((pl.col("backbone") == "bbA") & (pl.col("head") == "ensemble"))
    assert tg.sort("rank")["gene"][0] == "KRT19"
    # the scores behind the ranking equal a scipy recomputation from the predictions
    exp = _expected_pearson(tables)
    gs = gene_scores(tables["metrics"])
    for _, bb, head, gene, mean_r, _ in gs.iter_rows():
        vals = exp.get((bb, head, gene))
        if vals is None:  # the mean baseline: constant prediction, Pearson undefined
            assert head == "mean" and mean_r is None
        else:
            assert mean_r == pytest.approx(np.mean(vals), abs=2e-4)
    # every model keeps a row, baselines included
    assert set(gs.select("backbone", "head").unique().rows()) == {
        (b, h) for b in ("bbA", "bbB") for h in ("mean", "ridge", "nb", "ensemble")
    }


def test_files_exist_and_pngs_not_blank(report, tables):
    out = report.parent
    tg = top_genes(tables["metrics"], 3).filter((pl.col("backbone") == "bbA") & (pl.col("head") == "ensemble"))
    expected = {"report.md", "pcc_boxplot.png", "calibration.png"}
    expected |= {f"{kind}_{s}_{g}.png" for kind in ("spatial", "iou") for s in SLIDES for g in tg["gene"]}
    assert expected <= {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.load()
            a = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert 400 <= a.shape[1] <= 3000 and 300 <= a.shape[0] <= 3000, (png.name, a.shape)
        assert a.std() > 5, png.name
        assert (a.mean(axis=2) < 250).mean() > 0.05, f"{png.name}: almost all white"


def test_report_markdown(report, tables):
    text = report.read_text(encoding="utf-8")
    # leaderboard rows: names and the mean Pearson recomputed here with scipy, to 3 decimals
    exp = _expected_pearson(tables)
    lines = text.splitlines()
    for bb in ("bbA", "bbB"):
        for head in ("ridge", "nb", "ensemble"):
            mean_r = np.mean([v for (b, h, _), vals in exp.items() if (b, h) == (bb, head) for v in vals])
            row = f"| {bb} | {head} | {mean_r:.3f} |"
            assert any(line.startswith(row) for line in lines), row
        assert any(line.startswith(f"| {bb} | mean | n/a |") for line in lines)  # baseline kept, undefined r
    # every image link points at a written file, and every PNG is linked
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    pngs = {p.name for p in report.parent.glob("*.png")}
    assert links == pngs
    assert "spatial_S1_KRT19.png" in links and "iou_S2_KRT19.png" in links
    # configuration summary
    for word in ("synth", "loso", "bbA", "bbB", "ridge", "ensemble", "`KRT19`"):
        assert word in text


def test_nb_best_with_caps(tables, tmp_path):
    """Without ensemble runs the nb head is best (uncertainty from sqrt(variance)); the caps hold."""
    keep = pl.col("head") != "ensemble"
    m = tables["metrics"].filter(keep)
    runs = tables["runs"].filter(keep)
    preds = tables["predictions"].join(runs.select("run_id"), on="run_id", how="semi")
    path = write_report(tmp_path, m, preds, runs, tables["spots"], tables["leaderboard"], top_k_genes=1, max_slides=1)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["calibration.png", "iou_S1_KRT19.png", "pcc_boxplot.png", "spatial_S1_KRT19.png"]
    assert "**bbA / nb**" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("table", "column"),
    [("metrics", "value"), ("predictions", "mean_log1p"), ("runs", "test_slides"), ("spots", "pixel_x")],
)
def test_missing_column_raises(tables, tmp_path, table, column):
    t = dict(tables)
    t[table] = t[table].drop(column)
    with pytest.raises(ValueError, match=rf"{table}: {column}: missing column") as e:
        write_report(tmp_path, t["metrics"], t["predictions"], t["runs"], t["spots"], t["leaderboard"])
    assert isinstance(e.value, InputError)
    assert not (tmp_path / "report.md").exists()


def test_infer_layout():
    r, c = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    assert infer_layout(r.ravel(), c.ravel()) == "square"
    hex_c = 2 * c + (r % 2)  # Visium doubled columns: row + col always even
    assert infer_layout(r.ravel(), hex_c.ravel()) == "hex"
