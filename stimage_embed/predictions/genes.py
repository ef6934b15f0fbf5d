"""Which genes a fold is trained and scored on, chosen from the fold's TRAINING slides only.

Gene specs (:func:`parse_gene_spec`); the count-based ones first drop genes detected
(raw count > 0) in fewer than ``min_fraction`` (10 %) of the training spots:

* ``var:K`` (the default) — the top ``K`` genes by variance of log1p(CP10k), i.e. of
  ``log1p(count / library_size * 1e4)`` over the training spots (HEST-Benchmark's and
  most of the field's choice: genes with spatial structure a model can learn).
* ``mean:K`` — the top ``K`` by mean log1p(CP10k).
* ``seurat:K`` — the top ``K`` highly variable genes of scanpy's ``flavor="seurat"``
  (dispersion normalised within mean bins; see
  :mod:`stimage_embed.predictions.gene_scores`). It favours noisy, lowly expressed
  genes that are close to unpredictable from the image. ``hvg:K`` is an alias kept for
  older commands and stores.
* ``panel:NAME`` — the gene list ``catalogs/genes/NAME.txt`` (e.g. ``panel:stimage14``).
* ``file:PATH`` — a user gene list (one symbol per line, ``#`` comments, blank lines ok).

``K`` larger than the number of eligible genes is capped, with a warning.

The seurat-flavour statistics (and the other per-gene scores) are in
:mod:`stimage_embed.predictions.gene_scores`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from heads.scale import TARGET_SUM
from stimage_embed.errors import CatalogError, InputError
from stimage_embed.paths import catalogs_dir
from stimage_embed.predictions.gene_scores import (
    N_BINS,
    HVGStats,
    as_csr,
    detection_fraction,
    hvg_seurat,
    log1p_cp10k_moments,
    top_hvg,
)

log = logging.getLogger(__name__)

MIN_DETECTION_FRACTION = 0.1


#: count-based gene specs (kind -> how the top K are ranked); ``hvg`` is ``seurat``
RANKED_KINDS = ("var", "mean", "seurat")
DEFAULT_GENE_SPEC = "var:50"


@dataclass(frozen=True)
class GeneSpec:
    """A parsed gene specification: ``kind`` is ``var``, ``mean`` or ``seurat`` (with
    ``k``), ``panel`` (with ``name``) or ``file`` (with ``path``)."""

    kind: str
    k: int | None = None
    name: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind in RANKED_KINDS:
            return f"{self.kind}:{self.k}"
        if self.kind == "panel":
            return f"panel:{self.name}"
        return f"file:{self.path}"


def parse_gene_spec(spec: str) -> GeneSpec:
    """Parse ``"var:50"``, ``"mean:50"``, ``"seurat:50"`` (alias ``"hvg:50"``),
    ``"panel:stimage14"`` or ``"file:/path/genes.txt"``."""
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    expected = "'var:K', 'mean:K', 'seurat:K', 'panel:NAME' or 'file:PATH'"
    if not sep or not arg:
        raise InputError(None, "genes", f"bad gene spec {spec!r}; expected {expected}")
    if kind == "hvg":
        kind = "seurat"
    if kind in RANKED_KINDS:
        if not arg.isdigit() or int(arg) < 1:
            raise InputError(None, "genes", f"bad gene spec {spec!r}: K must be a positive integer")
        return GeneSpec(kind=kind, k=int(arg))
    if kind == "panel":
        if "/" in arg or "\\" in arg:
            raise InputError(None, "genes", f"bad gene spec {spec!r}: a panel is a name; use 'file:PATH' for a path")
        return GeneSpec(kind="panel", name=arg)
    if kind == "file":
        return GeneSpec(kind="file", path=Path(arg).expanduser())
    raise InputError(None, "genes", f"unknown gene spec kind {kind!r} in {spec!r}; expected {expected}")


def panel_path(name: str) -> Path:
    """Path of the named panel, ``<catalogs>/genes/<name>.txt``."""
    return catalogs_dir() / "genes" / f"{name}.txt"


def available_panels() -> list[str]:
    """Names of the panels shipped in ``<catalogs>/genes/``."""
    folder = catalogs_dir() / "genes"
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def read_gene_list(path: str | Path) -> list[str]:
    """Read a gene list: one symbol per line; ``#`` starts a comment; blanks ignored.

    Duplicates are dropped (first kept) with a warning; an empty list is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "genes", "gene list file not found")
    genes: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        sym = line.split("#", 1)[0].strip()
        if sym:
            genes.append(sym)
    if not genes:
        raise InputError(path, "genes", "gene list is empty")
    uniq = list(dict.fromkeys(genes))
    if len(uniq) != len(genes):
        dups = sorted({g for g in genes if genes.count(g) > 1})
        log.warning("%s: duplicate genes ignored: %s", path, dups)
    return uniq


def load_gene_list(spec: GeneSpec) -> tuple[list[str], Path]:
    """The genes of a ``panel`` or ``file`` spec, and the file they came from."""
    if spec.kind == "panel":
        assert spec.name is not None
        path = panel_path(spec.name)
        if not path.is_file():
            raise CatalogError(path, "genes", f"unknown gene panel {spec.name!r}; available: {available_panels()}")
        return read_gene_list(path), path
    if spec.kind == "file":
        assert spec.path is not None
        return read_gene_list(spec.path), spec.path
    raise InputError(None, "genes", f"{spec} is not a gene list spec")


def resolve_gene_list(
    wanted: Sequence[str], available: Sequence[str], *, source: str | Path | None = None
) -> list[str]:
    """The genes of ``wanted`` present in ``available``, in ``wanted`` order.

    Logs a WARNING naming every missing gene; raises :class:`InputError` if none is present.
    """
    have = set(available)
    present = [g for g in wanted if g in have]
    missing = [g for g in wanted if g not in have]
    if not present:
        if source is not None:  # a file: name it and count its entries, never echo its lines
            raise InputError(source, "genes", f"none of the file's {len(wanted)} entries is a gene in the data")
        raise InputError(source, "genes", f"none of the {len(wanted)} genes is in the data: {list(wanted)[:10]}")
    if missing:
        upper = {a.upper(): a for a in available}
        hints = [f"{g} (did you mean {upper[g.upper()]}?)" if g.upper() in upper else g for g in missing]
        log.warning(
            "%s: %d of %d genes not in the data, skipped: %s",
            source or "gene list",
            len(missing),
            len(wanted),
            ", ".join(hints[:20]) + (f", ... ({len(hints) - 20} more)" if len(hints) > 20 else ""),
        )
    return present


def _training_spots(x: sp.csr_matrix, genes: list[str], slide_ids, train_slides: Sequence[str]) -> np.ndarray:
    """Boolean mask of the training slides' spots, after checking the shapes and names."""
    if x.shape[1] != len(genes):
        raise InputError(None, "genes", f"{len(genes)} gene names for a counts matrix with {x.shape[1]} columns")
    if len(set(genes)) != len(genes):
        raise InputError(None, "genes", "gene names are not unique")
    slide_arr = np.asarray(slide_ids).astype(str)
    if slide_arr.shape != (x.shape[0],):
        raise InputError(None, "slide_id", f"{slide_arr.shape[0]} slide ids for {x.shape[0]} spots")
    train = np.isin(slide_arr, [str(s) for s in train_slides])
    if not train.any():
        raise InputError(None, "slide_id", f"no spots of the training slides {list(train_slides)}")
    return train


def _listed_genes(spec: GeneSpec, xt: sp.csr_matrix, genes: list[str]) -> list[str]:
    """A panel's / file's genes present in ``genes``, in list order; those never detected in
    the training spots ``xt`` are logged (kept: an explicit list is not filtered)."""
    wanted, path = load_gene_list(spec)
    present = resolve_gene_list(wanted, genes, source=path)
    detected = np.asarray((xt[:, [genes.index(g) for g in present]] > 0).sum(axis=0)).ravel()
    never = [g for g, d in zip(present, detected, strict=True) if d == 0]
    if never:
        log.warning("%s: genes never detected in the training spots: %s", path, ", ".join(never))
    return present


def _ranked_genes(
    spec: GeneSpec, xt: sp.csr_matrix, lib: np.ndarray, min_fraction: float, target_sum: float, n_bins: int
) -> np.ndarray:
    """Column indices of the ``spec.k`` top-scoring genes among those detected in
    >= ``min_fraction`` of the training spots ``xt`` (library sizes ``lib``, raw counts)."""
    keep = np.flatnonzero(detection_fraction(xt) >= min_fraction)
    if keep.size == 0:
        raise InputError(None, "genes", f"no gene is detected in >= {min_fraction:.0%} of the training spots")
    k = spec.k
    if k > keep.size:
        log.warning(
            "%s: only %d genes are detected in >= %.0f%% of the training spots; using all %d",
            spec,
            keep.size,
            100 * min_fraction,
            keep.size,
        )
        k = keep.size
    if spec.kind == "seurat":
        stats = hvg_seurat(xt[:, keep], library_size=lib, target_sum=target_sum, n_bins=n_bins)
        chosen = keep[top_hvg(stats, k)]
    else:
        score = log1p_cp10k_moments(xt[:, keep], lib, target_sum)[0 if spec.kind == "mean" else 1]
        chosen = keep[np.argsort(-score, kind="stable")[:k]]
    log.debug("%s from %d training spots, %d of %d genes pass detection", spec, xt.shape[0], keep.size, xt.shape[1])
    return chosen


def select_genes(
    spec: GeneSpec | str,
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    genes: Sequence[str],
    slide_ids: Sequence[str] | np.ndarray,
    train_slides: Sequence[str],
    *,
    library_size: np.ndarray | None = None,
    min_fraction: float = MIN_DETECTION_FRACTION,
    target_sum: float = TARGET_SUM,
    n_bins: int = N_BINS,
) -> list[str]:
    """The ordered genes of one fold, chosen from its training spots only.

    Parameters
    ----------
    spec : ``var:K`` / ``mean:K`` / ``seurat:K`` / ``panel:NAME`` / ``file:PATH`` (string or :class:`GeneSpec`).
    counts : (n_spots, n_genes) raw counts of all spots (train and test), dense or sparse.
    genes : (n_genes,) unique gene symbols, the columns of ``counts``.
    slide_ids : (n_spots,) slide of each spot; only spots of ``train_slides`` are used.
    train_slides : the fold's training slides.
    library_size : (n_spots,) total raw count per spot over ALL genes (default: row sums).
    min_fraction : ranked specs only: keep genes detected (count > 0) in >= this fraction of
        training spots.

    Returns
    -------
    ``var``/``mean``/``seurat``: the K genes by decreasing score. Panels/files: the listed
    genes present in ``genes``, in list order (missing ones logged as a warning; the
    detection filter is not applied to an explicit list).
    """
    if isinstance(spec, str):
        spec = parse_gene_spec(spec)
    genes = [str(g) for g in genes]
    x = as_csr(counts)
    train = _training_spots(x, genes, slide_ids, train_slides)
    if spec.kind in ("panel", "file"):
        return _listed_genes(spec, x[train], genes)
    if spec.kind not in RANKED_KINDS or spec.k is None:
        raise InputError(None, "genes", f"unsupported gene spec {spec}")
    xt = x[train]
    if library_size is None:
        lib = np.asarray(xt.sum(axis=1)).ravel()
    else:
        lib = np.asarray(library_size, dtype=np.float64)[train]
    return [genes[i] for i in _ranked_genes(spec, xt, lib, min_fraction, target_sum, n_bins)]


def fold_genes(store, train_slides: Sequence[str], spec: str) -> list[str]:
    """The genes of a fold (or a ``train`` run), selected by ``spec`` from the counts of its
    TRAINING slides only (``store``: a :class:`~stimage_embed.store.Store`)."""
    keys, genes, counts, lib = store.expression_matrix(list(train_slides))
    return select_genes(
        parse_gene_spec(spec), counts, genes, keys["slide_id"].to_numpy(), list(train_slides), library_size=lib
    )


__all__ = [
    "DEFAULT_GENE_SPEC",
    "MIN_DETECTION_FRACTION",
    "RANKED_KINDS",
    "GeneSpec",
    "HVGStats",
    "available_panels",
    "detection_fraction",
    "fold_genes",
    "hvg_seurat",
    "load_gene_list",
    "log1p_cp10k_moments",
    "panel_path",
    "parse_gene_spec",
    "read_gene_list",
    "resolve_gene_list",
    "select_genes",
    "top_hvg",
]
