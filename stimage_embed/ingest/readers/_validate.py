"""Checks every reader runs on the arrays it assembled, before building a SlideData.

All checks are vectorised and accept dense arrays or any ``scipy.sparse`` matrix (only
the stored values of a sparse matrix are inspected; implicit zeros are valid counts).
Each raises :class:`~stimage_embed.errors.InputError` naming the file and the field and
giving a few offending examples, so the user can find the bad value in the source file.

* :func:`validate_counts` -- raw counts must be finite, non-negative integers.
* :func:`validate_unique` -- spot ids, barcodes, gene names must not repeat.
* :func:`validate_coords` -- spot centres (pixels) must be finite.
* :func:`require_file` -- a path named in the catalog must exist.
* :func:`resolve_duplicate_genes` -- apply a reader's duplicate-gene policy
  (``"error"``, ``"make_unique"``, ``"sum"``).
* :func:`option_choice` -- read a ``reader_options`` value restricted to a set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.utils import make_index_unique

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

#: How many offending values an error message lists.
N_EXAMPLES = 5

DUPLICATE_GENE_POLICIES: tuple[str, ...] = ("error", "make_unique", "sum")


def _label(names: Sequence[str] | np.ndarray | None, index: int) -> str:
    return f"{index} ({str(names[index])!r})" if names is not None else str(index)


def validate_counts(
    matrix: np.ndarray | sp.spmatrix | sp.sparray,
    file: str | Path | None,
    field: str,
    row_names: Sequence[str] | np.ndarray | None = None,
    col_names: Sequence[str] | np.ndarray | None = None,
) -> None:
    """Check a spots x genes matrix holds raw counts: finite, >= 0, integer-valued.

    Parameters
    ----------
    matrix : dense array or scipy.sparse matrix of **raw counts** (any numeric dtype; float
        values are accepted when they are whole numbers, e.g. float32 AnnData ``X``).
    file, field : named in the error (e.g. the ``.h5`` path and ``"matrix/data"``).
    row_names, col_names : optional labels (spot ids, genes) used in the example.

    Raises
    ------
    InputError : on the first failing rule (non-numeric, NaN/inf, negative, non-integer),
        with the number of bad entries and an example ``row, col = value``.
    """
    if sp.issparse(matrix) and matrix.format not in ("csr", "csc", "coo"):
        matrix = matrix.tocsr()
    values = np.asarray(matrix.data) if sp.issparse(matrix) else np.asarray(matrix)
    if values.dtype.kind not in "biuf":
        raise InputError(file, field, f"counts must be numeric, got dtype {values.dtype}")
    if values.dtype.kind in "bu" or values.size == 0:
        return
    if values.dtype.kind == "i":
        rules = [("negative", values < 0)]
    else:
        finite = np.isfinite(values)
        rules = [
            ("non-finite (NaN or inf)", ~finite),
            ("negative", finite & (values < 0)),
            ("non-integer", finite & (values != np.round(values))),
        ]
    for what, bad in rules:
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            k = int(np.flatnonzero(bad.ravel())[0])
            r, c = _position(matrix, k)
            raise InputError(
                file,
                field,
                f"{n_bad} {what} count value(s); raw integer counts are required "
                f"(e.g. row {_label(row_names, r)}, column {_label(col_names, c)} = {values.ravel()[k].item()!r})",
            )


def _position(matrix: np.ndarray | sp.spmatrix | sp.sparray, k: int) -> tuple[int, int]:
    """(row, col) of the k-th stored value (sparse) or k-th flat element (dense)."""
    if not sp.issparse(matrix):
        shape = np.shape(matrix)
        if len(shape) < 2:
            return k, 0
        return tuple(int(i) for i in np.unravel_index(k, shape))  # type: ignore[return-value]
    if matrix.format == "coo":
        return int(matrix.row[k]), int(matrix.col[k])
    major = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
    minor = int(matrix.indices[k])
    return (major, minor) if matrix.format == "csr" else (minor, major)


def validate_unique(values: Sequence[str] | np.ndarray, file: str | Path | None, field: str, what: str) -> None:
    """Raise if ``values`` repeats; ``what`` names the kind (``"spot id"``, ``"gene name"``).

    The message gives the number of repeated values and the first few with their counts.
    """
    arr = np.asarray(values).astype(str)
    uniq, counts = np.unique(arr, return_counts=True)
    dup = counts > 1
    if dup.any():
        examples = ", ".join(f"{str(u)!r} x{int(c)}" for u, c in zip(uniq[dup][:N_EXAMPLES], counts[dup][:N_EXAMPLES]))
        more = " ..." if dup.sum() > N_EXAMPLES else ""
        raise InputError(file, field, f"{int(dup.sum())} duplicate {what}(s): {examples}{more}")


def validate_coords(
    x: np.ndarray,
    y: np.ndarray,
    file: str | Path | None,
    field: str = "pixel_x/pixel_y",
    ids: Sequence[str] | np.ndarray | None = None,
) -> None:
    """Raise if spot centres (full-resolution pixels) are not finite or x/y lengths differ."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise InputError(file, field, f"x and y have different lengths ({x.shape} vs {y.shape})")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        idx = np.flatnonzero(bad)[:N_EXAMPLES]
        ex = ", ".join(f"{_label(ids, int(i))}: ({x[i]}, {y[i]})" for i in idx)
        raise InputError(file, field, f"{int(bad.sum())} spot centre(s) are not finite, e.g. {ex}")


def require_file(
    path: Path | None, field: str, catalog_file: str | Path | None, reader: str, directory_ok: bool = False
) -> Path:
    """Return ``path`` if it exists; else raise naming the missing file (or the catalog
    field when the catalog does not name one). ``directory_ok`` accepts a folder too."""
    if path is None:
        raise InputError(catalog_file, field, f"the {reader} reader needs this path")
    if path.is_file() or (directory_ok and path.is_dir()):
        return path
    kind = "file or folder" if directory_ok else "file"
    raise InputError(path, field, f"{kind} does not exist")


def resolve_duplicate_genes(
    genes: np.ndarray,
    gene_ids: np.ndarray | None,
    counts: sp.csr_matrix,
    policy: str,
    file: str | Path | None,
    field: str,
) -> tuple[np.ndarray, np.ndarray | None, sp.csr_matrix]:
    """Make the gene vocabulary unique according to ``policy``.

    * ``"error"``: :func:`validate_unique` (raise naming the duplicates).
    * ``"make_unique"``: rename repeats like ``scanpy``'s ``var_names_make_unique``
      (``anndata.utils.make_index_unique``: ``A, A -> A, A-1``); counts unchanged.
    * ``"sum"``: merge columns of the same symbol by summing their raw counts; the merged
      gene id is the ids joined with ``";"``. Column order = first occurrence.

    ``counts`` is spots x genes raw counts (CSR). Returns (genes, gene_ids, counts).
    """
    if policy not in DUPLICATE_GENE_POLICIES:
        raise InputError(
            None, "reader_options.duplicate_genes", f"unknown policy {policy!r}; use one of {DUPLICATE_GENE_POLICIES}"
        )
    genes = np.asarray(genes).astype(str)
    uniq, first, inverse, n = np.unique(genes, return_index=True, return_inverse=True, return_counts=True)
    if (n == 1).all():
        return genes, gene_ids, counts
    if policy == "error":
        validate_unique(genes, file, field, "gene name")
    n_dup = int((n > 1).sum())
    if policy == "make_unique":
        new = np.asarray(make_index_unique(pd.Index(genes)), dtype=str)
        log.warning(
            "%s: %s: %d gene symbol(s) occur more than once (e.g. %s); made unique as "
            "'<symbol>-1', '<symbol>-2' (reader_options.duplicate_genes=make_unique)",
            file,
            field,
            n_dup,
            uniq[n > 1][:N_EXAMPLES].tolist(),
        )
        return new, gene_ids, counts
    # sum: column j of the result = sum of source columns whose symbol is the j-th first occurrence
    order = np.argsort(first)  # unique symbols in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    target = rank[inverse.ravel()]
    merge = sp.csr_matrix(
        (np.ones(len(genes), dtype=counts.dtype), (np.arange(len(genes)), target)), shape=(len(genes), len(uniq))
    )
    summed = (counts @ merge).tocsr()
    summed.sum_duplicates()
    new_genes = uniq[order]
    new_ids = None
    if gene_ids is not None:
        ids = np.asarray(gene_ids).astype(str)
        new_ids = ids[first[order]].astype(object)
        for j in np.flatnonzero(n[order] > 1):  # only the merged symbols
            new_ids[j] = ";".join(ids[target == j])
        new_ids = new_ids.astype(str)
    log.warning(
        "%s: %s: %d gene symbol(s) occur more than once (e.g. %s); their counts were summed "
        "(reader_options.duplicate_genes=sum)",
        file,
        field,
        n_dup,
        uniq[n > 1][:N_EXAMPLES].tolist(),
    )
    return new_genes, new_ids, summed


def option_choice(
    options: dict, key: str, default: str, allowed: Sequence[str], catalog_file: str | Path | None
) -> str:
    """``options[key]`` (default ``default``), checked against ``allowed``; the error names
    the catalog file and ``reader_options.<key>``."""
    value = options.get(key, default)
    if value not in allowed:
        raise InputError(catalog_file, f"reader_options.{key}", f"unknown value {value!r}; use one of {tuple(allowed)}")
    return str(value)
