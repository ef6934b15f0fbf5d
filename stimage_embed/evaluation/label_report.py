"""What ``compare`` shows of the label head: the mean scores per backbone x head x control
(macro-F1, balanced accuracy and its chance level over the held-out slides), the mean F1
per class, and a confusion matrix per backbone x head pooled over the held-out slides,
all read from ``label_metrics`` / ``label_predictions`` of the given runs (SQL: the same
numbers as ``SELECT ... FROM label_metrics``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from stimage_embed.evaluation.label_metrics import label_scores, plot_confusion
from stimage_embed.store.schema_labels import LABEL_METRICS_TABLE, LABEL_PREDICTIONS_TABLE
from stimage_embed.store.store import Store, sql_list

_KEYS = "m.dataset, r.split, m.label_set, m.control, m.backbone, m.head"


def label_summary(store: Store, run_ids: Sequence[str]) -> pl.DataFrame:
    """Per dataset x split x label set x control x backbone x head: folds, held-out slides,
    mean macro-F1, balanced accuracy and chance (1 / classes) over the held-out slides."""
    if not run_ids or not store.has_table(LABEL_METRICS_TABLE):
        return pl.DataFrame()
    return store.sql(
        f"""
        SELECT {_KEYS}, COUNT(DISTINCT m.fold) AS folds, COUNT(DISTINCT m.slide_id) AS slides,
               avg(value) FILTER (WHERE metric = 'macro_f1') AS macro_f1,
               avg(value) FILTER (WHERE metric = 'balanced_accuracy') AS balanced_accuracy,
               avg(value) FILTER (WHERE metric = 'chance') AS chance
        FROM {LABEL_METRICS_TABLE} m JOIN runs r USING (run_id)
        WHERE m.run_id IN ({sql_list(run_ids)})
        GROUP BY ALL ORDER BY ALL
        """
    )


def label_per_class(store: Store, run_ids: Sequence[str]) -> pl.DataFrame:
    """Mean F1 of each class over the held-out slides, one column per class."""
    if not run_ids or not store.has_table(LABEL_METRICS_TABLE):
        return pl.DataFrame()
    long = store.sql(
        f"""
        SELECT m.label_set, m.control, m.backbone, m.head, m.class, avg(m.value) AS f1
        FROM {LABEL_METRICS_TABLE} m
        WHERE m.run_id IN ({sql_list(run_ids)}) AND m.metric = 'f1'
        GROUP BY ALL ORDER BY ALL
        """
    )
    return long.pivot("class", index=["label_set", "control", "backbone", "head"], values="f1")


def write_confusions(store: Store, run_ids: Sequence[str], out_dir: Path, control: str = "none") -> list[Path]:
    """One confusion-matrix PNG per label set x backbone x head (``control`` runs), pooled
    over the held-out slides of their folds: ``confusion_<set>_<backbone>_<head>.png``."""
    if not run_ids or not store.has_table(LABEL_PREDICTIONS_TABLE):
        return []
    spots = store.sql(
        f"""
        SELECT DISTINCT split_part(r.gene_spec, ':', 2) AS label_set, r.backbone, r.head, p.run_id,
               p.slide_id, p.spot_id, p.label, p.observed
        FROM {LABEL_PREDICTIONS_TABLE} p JOIN runs r USING (run_id)
        WHERE p.run_id IN ({sql_list(run_ids)}) AND coalesce(r.control, 'none') = '{control}'
        """
    )
    out = []
    for (label_set, backbone, head), g in spots.group_by("label_set", "backbone", "head", maintain_order=True):
        s = label_scores(g["observed"].to_numpy(), g["label"].to_numpy())
        title = f"{label_set}: {head}/{backbone}, bal. acc. {s.balanced_accuracy:.2f}, macro-F1 {s.macro_f1:.2f}"
        out.append(plot_confusion(s, Path(out_dir) / f"confusion_{label_set}_{backbone}_{head}.png", title))
    return out


def label_section(store: Store, run_ids: Sequence[str], out_dir: Path) -> list[str]:
    """The report's Markdown section on the label head (and its confusion PNGs in ``out_dir``)."""
    from stimage_embed.evaluation.report_tables import markdown_table

    summary = label_summary(store, run_ids)
    if summary.height == 0:
        return []
    md = [
        "## Label head",
        "",
        "A categorical label per spot learned from the image vectors, scored on the held-out slides: macro-F1, "
        "balanced accuracy (mean recall per class) and its chance level (1 / classes). The `shuffled` control "
        "permutes the training labels within each slide and must score at chance.",
        "",
        markdown_table(summary.with_columns(pl.col(pl.Float64).round(3))),
        "",
        "Mean F1 per class:",
        "",
        markdown_table(label_per_class(store, run_ids).with_columns(pl.col(pl.Float64).round(3))),
        "",
    ]
    for png in write_confusions(store, run_ids, out_dir):
        md += [f"![{png.stem}]({png.name})", ""]
    return md


def write_label_report(store: Store, run_ids: Sequence[str], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` of a ``compare`` that ran only label heads (one write);
    with expression heads the label section is part of the compare report instead."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("# compare report\n\n" + "\n".join(label_section(store, run_ids, out_dir)), encoding="utf-8")
    return path
