"""Class maps of a label head's predictions: each spot / tile centre coloured by its
predicted class, optionally over the slide's thumbnail."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def class_map(
    path: Path,
    xy: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[str] | None = None,
    title: str = "",
    thumbnail: np.ndarray | None = None,
    downsample: float = 1.0,
) -> Path:
    """Scatter of centres ``xy`` (n, 2; level-0 px, y down) coloured by ``labels`` (n,), one
    colour per class of ``classes`` (default: the sorted labels); over ``thumbnail`` (whose
    px are ``downsample`` level-0 px) when given. Writes a PNG at ``path``."""
    labels = np.asarray(labels).astype(str)
    classes = [str(c) for c in (classes if classes is not None else sorted(set(labels)))]
    fig = Figure(figsize=(8.5, 6))
    ax = fig.subplots()
    if thumbnail is not None:
        h, w = thumbnail.shape[:2]
        ax.imshow(thumbnail, extent=(0, w * downsample, h * downsample, 0))
    for i, c in enumerate(classes):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=f"C{i % 10}", alpha=0.8, label=f"{c} (n={int(sel.sum())})")
    if thumbnail is None:
        ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    ax.set_title(title or "predicted class", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="predicted class")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
