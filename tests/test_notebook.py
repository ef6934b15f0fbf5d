"""The backbone-comparison notebook (notebooks/backbone_comparison.py, jupytext percent
format) executed end to end with nbclient on a copy of the ``embedded_store`` fixture
(HER2ST ingested, Lite0 vectors for C4/C5 cached), so it cannot rot.

Checks real outcomes: no cell errors; the displayed leaderboard names both backbones and
the heads; the report folder holds report.md and the box plot; the notebook's summary
agrees with independent reads of the store (Lance datasets directly, hand-written DuckDB
SQL) and its Pearson summaries with scipy on the stored predictions.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lance
import numpy as np
import polars as pl
import pytest
from conftest import EXPECTED_SPOTS
from scipy import stats

from stimage_embed.store import Store

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "backbone_comparison.py"
SLIDES = ["C4", "C5"]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1"]
HEADS = ["nb", "ridge", "mean", "fstimage"]
N_GENES = 20
KERNEL = "stimage-notebook-test"


def _kernel_manager(tmp: Path, env: dict[str, str]):
    """A kernel running this interpreter (the venv's), with ``env``, from a kernelspec in ``tmp``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "stimage-embed test kernel",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, embedded_store):
    tmp = tmp_path_factory.mktemp("notebook")
    store_dir = tmp / "store"
    shutil.copytree(embedded_store.path, store_dir)
    # a store that already holds runs of other settings (issue 25: a var:50 compare made the
    # notebook's top_genes pivot crash with two values per cell)
    from stimage_embed import CompareConfig, compare

    prior = CompareConfig(backbones=["efficientnet_lite0"], heads=["nb"], genes="var:50", datasets=["her2st"])
    compare(Store(store_dir), prior, progress=False)
    report_dir = tmp / "report"
    env = {
        "STIMAGE_NOTEBOOK_STORE": str(store_dir),
        "STIMAGE_NOTEBOOK_REPORT": str(report_dir),
        "STIMAGE_NOTEBOOK_SLIDES": ",".join(SLIDES),
        "STIMAGE_NOTEBOOK_WORKERS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    nb = jupytext.read(NOTEBOOK)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp, env),
        timeout=1200,
        allow_errors=True,
        resources={"metadata": {"path": str(tmp)}},
    )
    client.execute()
    return nb, Store(store_dir), report_dir


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        for key in ("text/plain", "text/html", "text/markdown"):
            parts.append(str(out.get("data", {}).get(key, "")))
    return "\n".join(parts)


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


@pytest.mark.slow
def test_notebook_runs_without_errors_and_shows_the_leaderboard(executed):
    nb, _, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every code cell ran"
    errors = [
        (i, o.get("ename"), o.get("evalue"))
        for i, c in enumerate(code)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors
    board = _outputs_text(_tagged(nb, "leaderboard"))
    for name in BACKBONES + HEADS:
        assert name in board, f"{name!r} missing from the leaderboard output"
    # the box plot and a spatial map are displayed inline as PNGs
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 3  # uncertainty plot, box plot, spatial map


@pytest.mark.slow
def test_report_folder_holds_report_and_figures(executed):
    _, _, report_dir = executed
    md = (report_dir / "report.md").read_text()
    assert "## Leaderboard" in md and all(b in md for b in BACKBONES)
    box = report_dir / "pcc_boxplot.png"
    assert box.stat().st_size > 10_000 and box.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(report_dir.glob("spatial_*.png"))


@pytest.mark.slow
def test_summary_agrees_with_the_store(executed):
    _, store, report_dir = executed
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["fold_slides"] == SLIDES and summary["folds"] == [f"loso:{s}" for s in SLIDES]
    assert summary["genes_per_fold"] == {f"loso:{s}": N_GENES for s in SLIDES}

    # vectors: every spot of each slide, once per backbone, read from the Lance tables directly
    for b in BACKBONES:
        tab = lance.dataset(str(store.path / f"embeddings_{b}.lance")).to_table(columns=["slide_id", "spot_id"])
        keys = pl.from_arrow(tab).filter(pl.col("slide_id").is_in(SLIDES))
        assert keys.height == keys.unique().height == sum(EXPECTED_SPOTS[s] for s in SLIDES)
        assert summary["vectors"][b] == keys.height

    # runs: 2 folds x (2 backbones x 3 single-backbone heads + fstimage)
    ids = summary["run_ids"]
    assert len(ids) == len(set(ids)) == len(SLIDES) * (len(BACKBONES) * 3 + 1)
    id_list = ", ".join(f"'{r}'" for r in ids)
    runs = store.sql(f"SELECT run_id, backbone, head, fold, len(genes) AS g FROM runs WHERE run_id IN ({id_list})")
    assert runs.height == len(ids) and set(runs["g"]) == {N_GENES}
    assert set(runs["head"]) == set(HEADS) and set(runs["backbone"]) == set(BACKBONES) | {"fstimage"}
    n_metrics = store.sql(f"SELECT COUNT(*) AS n FROM metrics WHERE run_id IN ({id_list})")["n"][0]
    assert summary["metric_rows"] == n_metrics > 0
    per_slide = store.sql(
        f"""SELECT run_id, COUNT(*) AS n FROM metrics
            WHERE run_id IN ({id_list}) AND metric = 'pearson' AND scope = 'slide' GROUP BY run_id"""
    )
    assert per_slide.height == len(ids) and set(per_slide["n"]) == {N_GENES}

    # per-(run, slide, gene) Pearson r recomputed with scipy from the stored predictions
    pred = store.sql(
        f"""SELECT r.backbone, r.head, p.slide_id, p.gene, p.observed, p.library_size, p.mean_log1p
            FROM predictions p JOIN runs r USING (run_id) WHERE p.run_id IN ({id_list})"""
    )
    rows = []
    for (bb, head, _slide, gene), g in pred.group_by("backbone", "head", "slide_id", "gene"):
        truth = np.log1p(g["observed"].to_numpy() / g["library_size"].to_numpy() * 1e4)
        guess = g["mean_log1p"].to_numpy().astype(np.float64)
        if head != "mean":  # the mean baseline is constant per slide: no Pearson r
            rows.append((bb, head, gene, stats.pearsonr(truth, guess)[0]))
    ref = pl.DataFrame(rows, schema=["backbone", "head", "gene", "r"], orient="row")
    board = {(e["backbone"], e["head"]): e for e in summary["leaderboard"]}
    assert set(board) == {(b, h) for b in BACKBONES for h in ("nb", "ridge", "mean")} | {("fstimage", "fstimage")}
    assert all(board[(b, "mean")]["pcc_mean"] is None for b in BACKBONES)
    assert ref.select("backbone", "head").unique().height == len(board) - len(BACKBONES)
    for (bb, head), g in ref.group_by("backbone", "head"):
        got = board[(bb, head)]
        assert got["pcc_mean"] == pytest.approx(g["r"].mean(), abs=1e-4), (bb, head)
        assert got["pcc_median"] == pytest.approx(g["r"].median(), abs=1e-4), (bb, head)

    # gene wins between the backbones, per head, from the recomputed per-gene mean r
    gene_r = ref.group_by("backbone", "head", "gene").agg(pl.col("r").mean())
    n_genes_union = store.sql(
        f"SELECT COUNT(DISTINCT g) AS n FROM (SELECT UNNEST(genes) AS g FROM runs WHERE run_id IN ({id_list}))"
    )["n"][0]
    wins = {w["head"]: w for w in summary["gene_wins"]}
    assert {"nb", "ridge"} <= set(wins)
    for head in ("nb", "ridge"):
        a = gene_r.filter((pl.col("backbone") == BACKBONES[0]) & (pl.col("head") == head))
        b = gene_r.filter((pl.col("backbone") == BACKBONES[1]) & (pl.col("head") == head))
        j = a.join(b, on="gene", suffix="_b")
        assert j.height == n_genes_union  # genes are chosen per fold, so the union may exceed N_GENES
        w = wins[head]
        assert (w["backbone_a"], w["backbone_b"], w["genes"]) == (BACKBONES[0], BACKBONES[1], n_genes_union)
        assert w["wins_a"] == int((j["r"] > j["r_b"]).sum())
        assert w["wins_b"] == int((j["r_b"] > j["r"]).sum())
