"""Kaplan-Meier figures (lifelines ``KaplanMeierFitter``, 95 % CIs drawn) with the log-rank p.

``km_plot``: one curve per group of a ``group`` column (risk groups, or the values of a
clinical column with ``--by``); the p of ``lifelines.statistics.multivariate_logrank_test``
over the groups (= the two-group log-rank test for two groups) is in the title.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.statistics import multivariate_logrank_test  # noqa: E402


def logrank_by_group(groups: pl.DataFrame) -> dict:
    """Log-rank test across the values of ``group`` (columns ``time``, ``event``, ``group``)."""
    g = groups.drop_nulls(["time", "event", "group"])
    res = multivariate_logrank_test(g["time"].to_numpy(), g["group"].cast(pl.String).to_numpy(), g["event"].to_numpy())
    return {"statistic": float(res.test_statistic), "p": float(res.p_value), "groups": g["group"].n_unique()}


def km_plot(groups: pl.DataFrame, path: Path, title: str, time_label: str = "time") -> dict:
    """Write the KM curves of each ``group`` with 95 % CIs and the log-rank p; return the test."""
    g = groups.drop_nulls(["time", "event", "group"])
    test = logrank_by_group(g)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in sorted(g["group"].cast(pl.String).unique().to_list()):
        sub = g.filter(pl.col("group").cast(pl.String) == name)
        kmf = KaplanMeierFitter(label=f"{name} (n={sub.height})")
        kmf.fit(sub["time"].to_numpy(), sub["event"].to_numpy())
        kmf.plot_survival_function(ax=ax, ci_show=True)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_title(f"{title}\nlog-rank p = {test['p']:.3g}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return test
