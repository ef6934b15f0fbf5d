"""Paired comparisons of (backbone, head) entries over the same (fold, test slide, gene)
pairs: the mean difference of a per-slide metric with a bootstrap 95 % CI, and a verdict
that is a tie whenever the CI covers 0.

Leaderboards rank means; two entries whose means differ by less than the noise of the
(slide, gene) sample are not different. Here the pairs both entries scored are matched
(same dataset, split, gene spec and control; same fold, test slide and gene), the
per-pair differences ``a - b`` are averaged, and the CI is the percentile interval of
that mean over ``n_boot`` resamples of the pairs with replacement (seeded).
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

from stimage_embed.evaluation.views import SCORES

GROUP = ("dataset", "split", "gene_spec", "control")
PAIR_KEY = ("fold", "slide_id", "gene")


def bootstrap_mean_ci(diff: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(diff)``: resample the entries with replacement
    ``n_boot`` times (seeded); returns ``(low, high)``."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    for start in range(0, int(n_boot), 256):  # chunks bound memory at 256 x n
        stop = min(int(n_boot), start + 256)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def compare_pair(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of matched scores ``a`` and ``b`` (same length): mean of each, the
    mean difference ``a - b``, its bootstrap 95 % CI and the verdict ``"a"``, ``"b"`` or
    ``"tie"`` (CI covers 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    lo, hi = bootstrap_mean_ci(d, n_boot=n_boot, seed=seed)
    verdict = "tie" if not (lo > 0 or hi < 0) else ("a" if lo > 0 else "b")
    return {
        "n_pairs": int(ok.sum()),
        "mean_a": float(a[ok].mean()) if ok.any() else float("nan"),
        "mean_b": float(b[ok].mean()) if ok.any() else float("nan"),
        "diff": float(d.mean()) if d.size else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "verdict": verdict,
    }


def paired_comparisons(
    store,
    metric: str = "pearson",
    run_ids: list[str] | None = None,
    controls: tuple[str, ...] = ("none",),
    n_boot: int = 2000,
    seed: int = 0,
) -> pl.DataFrame:
    """Every pair of (backbone, head) entries within each (dataset, split, gene spec,
    control), compared on the per-slide ``metric`` over their common (fold, slide, gene)
    pairs. Columns: the group keys, ``a_backbone, a_head, b_backbone, b_head``, then
    :func:`compare_pair`'s fields. ``a`` is the entry with the higher mean."""
    where = [f"metric = '{metric}'", "scope = 'slide'", "value IS NOT NULL"]
    if run_ids is not None:
        where.append("run_id IN (" + (", ".join("'" + r + "'" for r in run_ids) or "''") + ")")
    if controls:
        where.append("control IN (" + ", ".join("'" + c + "'" for c in controls) + ")")
    scores = store.sql(f"SELECT * FROM ({SCORES}) WHERE {' AND '.join(where)}")
    rows = []
    for keys, grp in scores.group_by(list(GROUP), maintain_order=True):
        entries = {k: g.select(*PAIR_KEY, "value") for k, g in grp.group_by(["backbone", "head"], maintain_order=True)}
        means = {k: float(v["value"].mean()) for k, v in entries.items()}
        for x, y in itertools.combinations(sorted(entries, key=lambda k: -means[k]), 2):
            j = (
                entries[x].join(entries[y], on=list(PAIR_KEY), suffix="_b").sort(list(PAIR_KEY))
            )  # a fixed order: reproducible CI
            res = compare_pair(j["value"].to_numpy(), j["value_b"].to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    **dict(zip(GROUP, keys)),
                    "a_backbone": x[0],
                    "a_head": x[1],
                    "b_backbone": y[0],
                    "b_head": y[1],
                    **res,
                }
            )
    if not rows:
        return pl.DataFrame(
            schema={
                **{k: pl.String for k in GROUP},
                "a_backbone": pl.String,
                "a_head": pl.String,
                "b_backbone": pl.String,
                "b_head": pl.String,
                "n_pairs": pl.Int64,
                "mean_a": pl.Float64,
                "mean_b": pl.Float64,
                "diff": pl.Float64,
                "ci_low": pl.Float64,
                "ci_high": pl.Float64,
                "verdict": pl.String,
            }
        )
    return pl.DataFrame(rows)
