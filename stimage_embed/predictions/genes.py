"""Which genes a fold is trained and scored on, chosen from the fold's TRAINING slides only.

Gene specs (:func:`parse_gene_spec`); the count-based ones first drop genes detected
(raw count > 0) in fewer than ``min_fraction`` (10 %) of the training spots:

* ``var:K`` (the default) — the top ``K`` genes by variance of log1p(CP10k), i.e. of
  ``log1p(count / library_size * 1e4)`` over the training spots (HEST-Benchmark's and
  most of the field's choice: genes with spatial structure a model can learn).
* ``mean:K`` — the top ``K`` by mean log1p(CP10k).
* ``seurat:K`` — the top ``K`` highly variable genes of scanpy's ``flavor="seurat"``
  (dispersion normalised within mean bins; see below). It favours noisy, lowly expressed
  genes that are close to unpredictable from the image. ``hvg:K`` is an alias kept for
  older commands and stores.
* ``panel:NAME`` — the gene list ``catalogs/genes/NAME.txt`` (e.g. ``panel:stimage14``).
* ``file:PATH`` — a user gene list (one symbol per line, ``#`` comments, blank lines ok).

``K`` larger than the number of eligible genes is capped, with a warning.

Seurat-flavour highly variable genes
------------------------------------
scanpy's ``highly_variable_genes(flavor="seurat")`` on
``log1p(normalize_total(counts, target_sum=1e4))``, re-implemented on arrays (no AnnData
round trip) and cross-checked against scanpy in the tests:

1. ``x = counts / library_size * target_sum`` (the log1p/expm1 round trip scanpy does for
   this flavour cancels), where ``library_size`` is the spot's total raw count over ALL
   genes (not just the genes that pass the detection filter);
2. per gene: ``mean``, ``var`` (ddof=1), ``dispersion = log(var / mean)`` (``NaN`` if 0),
   ``means = log1p(mean)``;
3. genes are binned into ``n_bins=20`` equal-width bins of ``means`` (``pandas.cut``
   semantics) and ``dispersions_norm = (dispersion - bin mean) / bin std`` (ddof=1; a bin
   holding a single gene gets ``dispersions_norm = 1``);
4. the top ``K`` by ``dispersions_norm`` (NaN last). Scanpy keeps every gene ``>=`` the
   K-th value, so exact ties at the cut-off can give it more than K genes; we return
   exactly K, ties broken by the input gene order.

The statistics are computed on the genes that pass the detection filter (the binning
depends on which genes are present), as scanpy would after subsetting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from heads.scale import TARGET_SUM, log1p_normalise
from stimage_embed.errors import CatalogError, InputError
from stimage_embed.paths import catalogs_dir

log = logging.getLogger(__name__)

MIN_DETECTION_FRACTION = 0.1
N_BINS = 20


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


@dataclass(frozen=True)
class HVGStats:
    """Per-gene statistics of the seurat-flavour HVG selection (aligned with the input
    genes). ``means`` is ``log1p(mean normalised count)``, ``dispersions`` is
    ``log(var/mean)`` of normalised counts, ``dispersions_norm`` the bin-standardised one."""

    means: np.ndarray
    dispersions: np.ndarray
    dispersions_norm: np.ndarray


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


def _as_csr(counts: np.ndarray | sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    return sp.csr_matrix(counts, dtype=np.float64)


def detection_fraction(counts: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    """Fraction of spots (rows) in which each gene (column) has a raw count > 0."""
    x = _as_csr(counts)
    if x.shape[0] == 0:
        raise InputError(None, "counts", "no spots")
    return np.asarray((x > 0).sum(axis=0)).ravel() / x.shape[0]


def hvg_seurat(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    library_size: np.ndarray | None = None,
    target_sum: float = TARGET_SUM,
    n_bins: int = N_BINS,
) -> HVGStats:
    """Seurat-flavour HVG statistics (scanpy ``flavor="seurat"``), see module docstring.

    Parameters
    ----------
    counts : (n_spots, n_genes) raw counts, dense or sparse.
    library_size : (n_spots,) total raw count of each spot over ALL genes; defaults to
        the row sums of ``counts`` (correct only if ``counts`` holds all genes).
    target_sum : counts per spot after normalisation.
    """
    x = _as_csr(counts)
    n = x.shape[0]
    if n < 2:
        raise InputError(None, "counts", f"HVG needs at least 2 spots, got {n}")
    lib = np.asarray(x.sum(axis=1)).ravel() if library_size is None else np.asarray(library_size, dtype=np.float64)
    if lib.shape != (n,):
        raise InputError(None, "library_size", f"shape {lib.shape} does not match {n} spots")
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    xn = sp.diags(scale) @ x
    mean = np.asarray(xn.mean(axis=0)).ravel()
    mean_sq = np.asarray(xn.multiply(xn).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / (n - 1))
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    means = np.log1p(mean)
    disp_norm = _bin_normalise(means, dispersion, n_bins)
    return HVGStats(means=means, dispersions=dispersion, dispersions_norm=disp_norm)


def _cut_equal_width(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value, as ``pandas.cut(values, bins=n_bins)`` (right-closed)."""
    mn, mx = float(values.min()), float(values.max())
    if mn == mx:
        mn -= 0.001 * abs(mn) if mn != 0 else 0.001
        mx += 0.001 * abs(mx) if mx != 0 else 0.001
        edges = np.linspace(mn, mx, n_bins + 1)
    else:
        edges = np.linspace(mn, mx, n_bins + 1)
        edges[0] -= (mx - mn) * 0.001
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def _bin_normalise(means: np.ndarray, dispersion: np.ndarray, n_bins: int) -> np.ndarray:
    bins = _cut_equal_width(means, n_bins)
    ok = np.isfinite(dispersion)
    cnt = np.bincount(bins[ok], minlength=n_bins).astype(np.float64)
    s1 = np.bincount(bins[ok], weights=dispersion[ok], minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = s1 / cnt
        dev_sq = np.bincount(bins[ok], weights=(dispersion[ok] - avg[bins[ok]]) ** 2, minlength=n_bins)
        dev = np.sqrt(dev_sq / (cnt - 1))
        single = cnt < 2  # pandas std is NaN here: scanpy sets avg=0, dev=avg
        dev[single] = avg[single]
        avg[single] = 0.0
        return (dispersion - avg[bins]) / dev[bins]


def log1p_cp10k_moments(
    counts: np.ndarray | sp.spmatrix | sp.sparray, library_size: np.ndarray, target_sum: float = TARGET_SUM
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene (column): mean and variance (ddof=1) over spots of
    ``log1p(count / library_size * target_sum)``; ``library_size`` is each spot's total raw
    count over ALL genes. Sparse-aware (zeros stay zeros on this scale)."""
    x = _as_csr(counts)
    n = x.shape[0]
    xl = log1p_normalise(x, library_size, target_sum)
    mean = np.asarray(xl.mean(axis=0)).ravel()
    mean_sq = np.asarray(xl.multiply(xl).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / max(n - 1, 1))
    return mean, var


def top_hvg(stats: HVGStats, k: int) -> np.ndarray:
    """Indices of the ``k`` genes with the largest ``dispersions_norm`` (NaN never picked;
    ties by input order). Returns fewer than ``k`` (with a warning) if fewer are finite."""
    score = np.nan_to_num(stats.dispersions_norm, nan=-np.inf)
    order = np.argsort(-score, kind="stable")
    n_finite = int(np.isfinite(stats.dispersions_norm).sum())
    if k > n_finite:
        log.warning("asked for %d highly variable genes, only %d have a finite normalised dispersion", k, n_finite)
        k = n_finite
    return order[:k]


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
    x = _as_csr(counts)
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

    if spec.kind in ("panel", "file"):
        wanted, path = load_gene_list(spec)
        present = resolve_gene_list(wanted, genes, source=path)
        idx = [genes.index(g) for g in present]
        never = [
            g for g, d in zip(present, np.asarray((x[train][:, idx] > 0).sum(axis=0)).ravel(), strict=True) if d == 0
        ]
        if never:
            log.warning("%s: genes never detected in the training spots: %s", path, ", ".join(never))
        return present
    if spec.kind not in RANKED_KINDS or spec.k is None:
        raise InputError(None, "genes", f"unsupported gene spec {spec}")

    xt = x[train]
    lib = (
        np.asarray(xt.sum(axis=1)).ravel()
        if library_size is None
        else np.asarray(library_size, dtype=np.float64)[train]
    )
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
    log.debug("%s from %d training spots, %d of %d genes pass detection", spec, xt.shape[0], keep.size, len(genes))
    return [genes[i] for i in chosen]


def fold_genes(store, train_slides: Sequence[str], spec: str) -> list[str]:
    """The genes of a fold (or a ``train`` run), selected by ``spec`` from the counts of its
    TRAINING slides only (``store``: a :class:`~stimage_embed.store.Store`)."""
    keys, genes, counts, lib = store.expression_matrix(list(train_slides))
    return select_genes(
        parse_gene_spec(spec), counts, genes, keys["slide_id"].to_numpy(), list(train_slides), library_size=lib
    )
