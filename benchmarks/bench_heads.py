"""Issue 4 benchmark: fitting the NB head on cached vectors against one epoch of a
frozen-backbone model that recomputes the backbone for every tile (as STimage does),
measured side by side in one run on the nine real sections.

* Ours: per dataset (HER2ST and MOB have different gene vocabularies, so one
  ``NBRegressor`` per dataset, fitted on ALL its slides' QC spots), the top-K HVG chosen
  from that dataset's slides (``select_genes("hvg:K")``, what ``fold_genes`` does with all
  slides as training slides), cached vectors + raw counts loaded with
  ``load_spot_arrays`` (timed as its own column), then ``NBRegressor(random_state=0,
  device="cpu").fit(X, counts, groups=slide, library_size=...)`` with the head's default
  epochs / early stopping. The "all" row is the sum over the two datasets.
* STimage-style epoch: for every QC spot of the nine sections, read the tile from the slide
  (``SlideImage`` + ``TileReader``, spot diameter (100 µm) -> 224 px, bicubic, no stain
  normalisation), run the frozen backbone forward (float32, ``torch.no_grad``), then a
  linear NB head (K genes of the spot's dataset, log-mean + per-gene dispersion, the same
  likelihood as ``NBRegressor``) forward/backward and one Adam step, in batches of
  ``--batch-size`` (32) spots of one slide. Slide decode is a per-slide fixed cost and is
  timed for all nine slides; the per-tile costs (tile read, backbone forward, head step)
  are timed on ``--stimage-tiles`` spots spread evenly over the nine slides and, when that
  is fewer than all spots, extrapolated linearly (the tables say "extrapolated from N
  tiles"). STimage's tf.data pipeline ``.cache()``s the decoded tiles after the first
  epoch, so epoch 1 = decode + read + forward + head and later epochs = forward + head
  only; both are printed. STimage's own defaults (``example.ini`` / ``02_Training.py``):
  ``epochs = 100`` with Keras early stopping (patience 10), batch 64; its HER2ST benchmark
  script uses 100 epochs, patience 20, batch 32, ResNet50 at 299 px (heavier than
  efficientnet_lite0 at 224 px, so this comparison favours STimage per epoch).
* Scaling: one ``NBRegressor`` on n spots x dim with K genes at 1x, 4x, 16x. 1x is the real
  data: all nine sections' vectors (2642 spots if all are embedded) with counts in K "gene
  slots" (slot j = HER2ST's j-th HVG for HER2ST spots, MOB's j-th HVG for MOB spots),
  groups = slides. 4x/16x are synthetic: X ~ Gaussian with the real vectors' mean and
  covariance; library sizes resampled from the real ones; counts drawn from the NB the 1x
  fit predicts at those X and library sizes (so per-gene moments match the real data and
  the fit has the same signal to find); groups = the nine slide labels repeated. Same
  head settings; the number of epochs each fit ran is printed so per-epoch cost is visible.

Needs a store with ingested sections and vectors (``--store DIR``). Without ``--store`` it
builds one in a temp dir (ingest both datasets + ``embed`` with ``--backbone``, stain
macenko): that adds ~5-10 minutes on 2 CPU cores and is not part of the timings.

    python benchmarks/bench_heads.py --store /tmp/demo/store [--genes 250]
        [--stimage-tiles 288 (0 = all spots)] [--scales 1,4,16] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _common import table, timer

from heads import NBRegressor, nb_log_prob_log_mu
from stimage_embed.backbones import create_model
from stimage_embed.predictions.arrays import SpotArrays, load_spot_arrays
from stimage_embed.predictions.genes import select_genes
from stimage_embed.store import Store
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.window import TileGeometry, TileReader

STIMAGE_MAX_EPOCHS = 100  # example.ini [TRAINING] epochs; early stopping may end sooner


def build_store(root: Path, backbone: str) -> Store:
    """Ingest both datasets and embed them with ``backbone`` into a fresh store (slow)."""
    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.ingest.pipeline import ingest

    store = Store(root / "store")
    ingest("her2st", store, progress=False)
    ingest("stutility_mob", store, progress=False)
    embed(store, [backbone], progress=False)
    return store


def dataset_slides(store: Store) -> dict[str, list[str]]:
    s = store.sql("SELECT dataset, slide_id FROM slides ORDER BY dataset, slide_id")
    return {
        ds: s.filter(pl.col("dataset") == ds)["slide_id"].to_list() for ds in s["dataset"].unique(maintain_order=True)
    }


def hvg_genes(store: Store, slides: list[str], k: int) -> list[str]:
    """Top-k HVG over ``slides`` (as ``fold_genes`` with all of them as training slides)."""
    keys, genes, counts, lib = store.expression_matrix(slides)
    return select_genes(f"hvg:{k}", counts, genes, keys["slide_id"].to_numpy(), slides, library_size=lib)


def fit_nb(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, lib: np.ndarray, max_epochs: int | None = None
) -> tuple[NBRegressor, float]:
    """Fit ``NBRegressor`` (head defaults, seed 0, CPU; ``max_epochs`` overrides the default)."""
    params = {} if max_epochs is None else {"max_epochs": max_epochs}
    t0 = time.perf_counter()
    model = NBRegressor(random_state=0, device="cpu", **params).fit(X, y, groups=groups, library_size=lib)
    return model, time.perf_counter() - t0


# ----------------------------------------------------------------------------- STimage epoch
class LinearNBHead(torch.nn.Module):
    """Linear NB head on backbone features: log-mean per gene + per-gene log dispersion."""

    def __init__(self, dim: int, n_genes: int):
        super().__init__()
        self.out = torch.nn.Linear(dim, n_genes)
        self.log_theta = torch.nn.Parameter(torch.zeros(n_genes))

    def nll(self, feats: torch.Tensor, y: torch.Tensor, log_offset: torch.Tensor) -> torch.Tensor:
        return -nb_log_prob_log_mu(y, self.out(feats) + log_offset[:, None], self.log_theta[None, :]).mean()


def subset_rows(slide_ids: np.ndarray, n_total: int, batch_size: int) -> np.ndarray:
    """Row indices to time: all rows if ``n_total`` is 0, else about ``n_total`` rows in
    whole batches, the same share of each slide, spread evenly over the slide's spots."""
    if n_total <= 0 or n_total >= slide_ids.size:
        return np.arange(slide_ids.size)
    out = []
    for s in np.unique(slide_ids):
        rows = np.flatnonzero(slide_ids == s)
        k = min(rows.size, batch_size * max(1, round(n_total * rows.size / slide_ids.size / batch_size)))
        out.append(rows[np.linspace(0, rows.size - 1, k).round().astype(int)])
    return np.concatenate(out)


def stimage_epoch(store: Store, arrays: dict[str, SpotArrays], backbone: str, n_tiles: int, batch_size: int) -> dict:
    """Time the STimage-style epoch components (see module doc)."""
    torch.manual_seed(0)
    bb = create_model(backbone, device="cpu")
    for p in bb.parameters():
        p.requires_grad_(False)
    slides = store.sql("SELECT slide_id, image_path, um_per_px, spot_diameter_um FROM slides")
    meta = {r["slide_id"]: r for r in slides.iter_rows(named=True)}
    t = {"decode": 0.0, "read": 0.0, "forward": 0.0, "head": 0.0}
    n_used = n_all = 0
    with torch.no_grad():  # warm-up batch (thread pools, allocator), not timed
        bb(bb.preprocess(torch.zeros((batch_size, bb.input_size, bb.input_size, 3), dtype=torch.uint8)))
    for arr in arrays.values():
        head = LinearNBHead(bb.embed_dim, arr.counts.shape[1])
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        ref = float(np.median(arr.library_size))
        sid = arr.groups.astype(str)
        n_all += sid.size
        share = n_tiles * sid.size // sum(a.groups.size for a in arrays.values()) if n_tiles > 0 else 0
        rows_all = subset_rows(sid, share, batch_size)
        for s in np.unique(sid):
            m = meta[s]
            t0 = time.perf_counter()
            img = SlideImage.open(m["image_path"])
            t["decode"] += time.perf_counter() - t0
            reader = TileReader(img, m["um_per_px"], TileGeometry(m["spot_diameter_um"], bb.input_size))
            rows = rows_all[sid[rows_all] == s]
            n_used += rows.size
            xs, ys = arr.keys["pixel_x"].to_numpy()[rows], arr.keys["pixel_y"].to_numpy()[rows]
            for start in range(0, rows.size, batch_size):
                sl = slice(start, start + batch_size)
                t0 = time.perf_counter()
                tiles = np.stack([reader.read(x, y)[0] for x, y in zip(xs[sl], ys[sl])])
                t1 = time.perf_counter()
                with torch.no_grad():
                    feats = bb(bb.preprocess(torch.from_numpy(tiles))).float()
                t2 = time.perf_counter()
                y = torch.as_tensor(arr.counts[rows[sl]], dtype=torch.float32)
                off = torch.as_tensor(np.log(arr.library_size[rows[sl]] / ref), dtype=torch.float32)
                opt.zero_grad(set_to_none=True)
                loss = head.nll(feats, y, off)
                loss.backward()
                opt.step()
                t3 = time.perf_counter()
                t["read"] += t1 - t0
                t["forward"] += t2 - t1
                t["head"] += t3 - t2
            img.close()
    scale = n_all / n_used
    return {
        "n_used": n_used,
        "n_all": n_all,
        "scale": scale,
        "decode": t["decode"],
        **{k: t[k] * scale for k in ("read", "forward", "head")},
        "measured": dict(t),
    }


# ----------------------------------------------------------------------------- scaling
def synthetic(
    real_X: np.ndarray,
    real_lib: np.ndarray,
    real_groups: np.ndarray,
    model: NBRegressor,
    factor: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``factor`` x the real spots: Gaussian X with the real mean/covariance, resampled
    library sizes, NB counts drawn from ``model`` at those X (raw counts)."""
    n = real_X.shape[0] * factor
    mu = real_X.astype(np.float64).mean(axis=0)
    cov = np.cov(real_X.astype(np.float64), rowvar=False)
    L = np.linalg.cholesky(cov + 1e-6 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]))
    X = mu.astype(np.float32) + rng.standard_normal((n, mu.size), dtype=np.float32) @ L.T.astype(np.float32)
    lib = rng.choice(real_lib, size=n, replace=True)
    pred = model.predict_dist(X, library_size=lib, quantiles=())
    y = rng.negative_binomial(pred.r, pred.p).astype(np.int64)
    groups = np.repeat(real_groups, factor)  # same nine slide labels, each factor x larger
    return X, y, groups, lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--store",
        default=None,
        help="store with ingested sections and vectors (default: build one in a temp dir, slow)",
    )
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--genes", type=int, default=250, help="top-K HVG per dataset")
    ap.add_argument(
        "--stimage-tiles",
        type=int,
        default=288,
        help="tiles timed for the STimage epoch, in whole batches per slide (0 = all spots)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument(
        "--scale-max-epochs",
        type=int,
        default=20,
        help="max_epochs of the scaling fits (0 = the head default, 300: ~1 h at 16x on a loaded 2-core box)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmpd:
        store = Store(args.store) if args.store else build_store(Path(tmpd), args.backbone)

        # --- ours: load + fit per dataset ----------------------------------------------
        arrays: dict[str, SpotArrays] = {}
        models: dict[str, NBRegressor] = {}
        rows, tot = [], {"load": 0.0, "fit": 0.0, "n": 0}
        for ds, slides in dataset_slides(store).items():
            t: dict[str, float] = {}
            with timer(t, "load"):
                genes = hvg_genes(store, slides, args.genes)
                arr = load_spot_arrays(store, args.backbone, slides, genes, only_qc=True)
            models[ds], t["fit"] = fit_nb(arr.X, arr.counts, arr.groups, arr.library_size)
            arrays[ds] = arr
            m = models[ds]
            n = arr.X.shape[0]
            tot["load"] += t["load"]
            tot["fit"] += t["fit"]
            tot["n"] += n
            rows.append(
                (
                    ds,
                    len(np.unique(arr.groups)),
                    n,
                    f"{arr.X.shape[1]}",
                    len(genes),
                    f"{t['load']:.2f}",
                    f"{t['fit']:.2f}",
                    m.n_epochs_,
                    m.best_epoch_ + 1,
                    f"{1000 * t['fit'] / m.n_epochs_:.1f}",
                )
            )
        rows.append(
            ("all", sum(r[1] for r in rows), tot["n"], "", "", f"{tot['load']:.2f}", f"{tot['fit']:.2f}", "", "", "")
        )
        print(
            f"\nOurs: NBRegressor on cached {args.backbone} vectors, top-{args.genes} HVG per "
            "dataset, one fit per dataset"
        )
        print(
            table(
                rows,
                (
                    "dataset",
                    "slides",
                    "spots",
                    "dim",
                    "genes",
                    "load s (HVG + arrays)",
                    "fit s",
                    "epochs run",
                    "best epoch",
                    "ms/epoch",
                ),
            )
        )

        # --- STimage-style epoch ---------------------------------------------------------
        st = stimage_epoch(store, arrays, args.backbone, args.stimage_tiles, args.batch_size)
        label = "all tiles measured" if st["n_used"] == st["n_all"] else f"extrapolated from {st['n_used']} tiles"
        epoch1 = st["decode"] + st["read"] + st["forward"] + st["head"]
        cached = st["forward"] + st["head"]
        print(
            f"\nSTimage-style epoch, frozen {args.backbone} recomputed per tile, batch {args.batch_size}, "
            f"{st['n_all']} spots ({label}; slide decode measured for all slides)"
        )
        per_tile_ms = {k: 1000 * st["measured"][k] / st["n_used"] for k in ("read", "forward", "head")}
        print(
            table(
                [
                    ("slide decode (9 slides, fixed)", f"{st['decode']:.1f}", ""),
                    ("tile read 100 µm -> 224 px", f"{st['read']:.1f}", f"{per_tile_ms['read']:.2f}"),
                    ("backbone forward (fp32)", f"{st['forward']:.1f}", f"{per_tile_ms['forward']:.2f}"),
                    ("NB head fwd/bwd + Adam step", f"{st['head']:.2f}", f"{per_tile_ms['head']:.3f}"),
                    ("epoch 1 (decode+read+forward+head)", f"{epoch1:.1f}", ""),
                    ("epoch >= 2 (tiles cached: forward+head)", f"{cached:.1f}", ""),
                ],
                ("component", "seconds per epoch", "ms per tile"),
            )
        )

        ours_fit, ours_total = tot["fit"], tot["fit"] + tot["load"]
        embed_once = st["decode"] + st["read"] + st["forward"]  # what our one-off embedding pass costs, same path
        stimage_100 = epoch1 + (STIMAGE_MAX_EPOCHS - 1) * cached
        print(
            f"\nRatios (STimage / ours); STimage's default is up to {STIMAGE_MAX_EPOCHS} epochs "
            "(example.ini; Keras early "
            f"stopping may end sooner), so the real ratio is ~ the per-epoch ratio x its epoch count"
        )
        print(
            table(
                [
                    (
                        "1 STimage epoch (epoch 1) / our NB fits",
                        f"{epoch1:.1f}",
                        f"{ours_fit:.2f}",
                        f"{epoch1 / ours_fit:.1f}x",
                    ),
                    (
                        "1 STimage epoch (cached) / our NB fits",
                        f"{cached:.1f}",
                        f"{ours_fit:.2f}",
                        f"{cached / ours_fit:.1f}x",
                    ),
                    (
                        "1 STimage epoch (epoch 1) / our load + fits",
                        f"{epoch1:.1f}",
                        f"{ours_total:.2f}",
                        f"{epoch1 / ours_total:.1f}x",
                    ),
                    (
                        f"{STIMAGE_MAX_EPOCHS} STimage epochs / our load + fits",
                        f"{stimage_100:.0f}",
                        f"{ours_total:.2f}",
                        f"{stimage_100 / ours_total:.0f}x",
                    ),
                    (
                        f"{STIMAGE_MAX_EPOCHS} STimage epochs / (one-off embed pass + load + fits)",
                        f"{stimage_100:.0f}",
                        f"{embed_once + ours_total:.1f}",
                        f"{stimage_100 / (embed_once + ours_total):.1f}x",
                    ),
                ],
                ("comparison", "STimage s", "ours s", "ratio"),
            )
        )
        print(
            "(one-off embed pass estimated as decode + tile read + forward on the same path; it is "
            "shared by every head fitted later)"
        )

        # --- scaling ---------------------------------------------------------------------
        ds_list = list(arrays)
        k = min(a.counts.shape[1] for a in arrays.values())
        X1 = np.concatenate([arrays[d].X for d in ds_list])
        y1 = np.concatenate([arrays[d].counts[:, :k] for d in ds_list])
        g1 = np.concatenate([arrays[d].groups for d in ds_list])
        lib1 = np.concatenate([arrays[d].library_size for d in ds_list])
        rng = np.random.default_rng(0)
        default_epochs = NBRegressor().max_epochs
        srows, base, base_model = [], None, None
        factors = sorted({1, *(int(f) for f in args.scales.split(","))})  # 1x first: it generates the synthetic counts
        for factor in factors:
            if factor == 1:
                X, y, g, lib = X1, y1, g1, lib1
            else:
                X, y, g, lib = synthetic(X1, lib1, g1, base_model, factor, rng)
            model, sec = fit_nb(X, y, g, lib, args.scale_max_epochs or None)
            if factor == 1:
                base_model, base = model, 1000 * sec / model.n_epochs_
            ms_ep = 1000 * sec / model.n_epochs_
            srows.append(
                (
                    f"{factor}x" + (" (real)" if factor == 1 else " (synthetic)"),
                    X.shape[0],
                    X.shape[1],
                    y.shape[1],
                    f"{sec:.2f}",
                    model.n_epochs_,
                    f"{ms_ep:.1f}",
                    f"{ms_ep / base:.1f}x",
                    f"{ms_ep / (X.shape[0] / 1000):.2f}",
                    f"{ms_ep * default_epochs / 1000:.0f}",
                )
            )
        cap = f"max_epochs={args.scale_max_epochs}" if args.scale_max_epochs else "default max_epochs"
        print(
            f"\nNBRegressor fit time vs number of spots ({k} gene slots, {cap}, default patience, "
            "full batch; 4x/16x counts "
            f"drawn from the 1x fit)"
        )
        print(
            table(
                srows,
                (
                    "scale",
                    "spots",
                    "dim",
                    "genes",
                    "fit s",
                    "epochs run",
                    "ms/epoch",
                    "ms/epoch vs 1x",
                    "ms/epoch per 1000 spots",
                    f"s at {default_epochs} epochs (est.)",
                ),
            )
        )
        print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
