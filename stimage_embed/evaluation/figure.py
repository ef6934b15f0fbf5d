"""Figure plumbing shared by the report's plots: a matplotlib ``Figure`` on an Agg canvas
(object API, no pyplot: no global figure registry, no display) and saving it as a PNG."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: resolution of every report figure (dots per inch)
DPI = 110


def new_figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG, white background, parents created), free it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    fig.clear()
    return path
