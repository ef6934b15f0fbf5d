"""10x count matrices (Cell Ranger / Space Ranger / Xenium): the HDF5 file and the Matrix
Market folder, read into ``(barcodes, genes, gene_ids, counts)``.

* ``*.h5`` (10x HDF5 v3 layout: ``matrix/data``, ``indices``, ``indptr``, ``shape``,
  ``barcodes``, ``features/{id,name,feature_type}``);
* a folder with ``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]`` and ``features.tsv[.gz]``
  (Space Ranger < 2: ``genes.tsv``).

Only features of type ``"Gene Expression"`` are kept. Counts are raw integers (validated),
spots x genes, CSR.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from stimage_embed.errors import InputError
from stimage_embed.ingest.readers._validate import validate_counts, validate_unique

log = logging.getLogger(__name__)

#: the feature type of genes (antibody / probe-control features are not genes)
GENE_EXPRESSION = "Gene Expression"


def read_10x_h5(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """Read a 10x HDF5 (v3) feature-barcode matrix.

    Returns (barcodes, feature names, feature ids, feature types, counts) with counts a
    barcodes x features CSR of the stored values (not yet validated).
    """
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, "counts", f"not a readable HDF5 file: {exc}") from exc
    with f:
        if "matrix" not in f:
            groups = ", ".join(sorted(f.keys())) or "none"
            raise InputError(
                path,
                "matrix",
                f"no 'matrix' group (top-level groups: {groups}); expected the 10x "
                "HDF5 v3 layout of Space Ranger / Cell Ranger >= 3",
            )

        def get(key: str) -> np.ndarray:
            if key not in f["matrix"]:
                raise InputError(path, f"matrix/{key}", "missing dataset (10x HDF5 v3 layout expected)")
            return f["matrix"][key][()]

        data, indices, indptr, shape = get("data"), get("indices"), get("indptr"), get("shape")
        barcodes, names, ids = get("barcodes"), get("features/name"), get("features/id")
        types = get("features/feature_type") if "features/feature_type" in f["matrix"] else None
    decode = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else str(b), otypes=[object])
    barcodes, names, ids = (decode(a).astype(str) for a in (barcodes, names, ids))
    types = decode(types).astype(str) if types is not None else np.full(len(names), GENE_EXPRESSION)
    n_feat, n_bc = (int(v) for v in shape)
    if len(names) != n_feat or len(ids) != n_feat or len(types) != n_feat:
        raise InputError(path, "matrix/features", f"{len(names)} feature names for a matrix of {n_feat} features")
    if len(barcodes) != n_bc or len(indptr) != n_bc + 1:
        raise InputError(
            path,
            "matrix/barcodes",
            f"{len(barcodes)} barcodes / {len(indptr)} indptr entries for a matrix of {n_bc} barcodes",
        )
    if len(data) != len(indices) or indptr[-1] != len(data):
        raise InputError(path, "matrix/data", "data, indices and indptr lengths disagree")
    try:
        # stored as features x barcodes CSC; its transpose is barcodes x features CSR
        counts = sp.csc_matrix((data, indices, indptr), shape=(n_feat, n_bc)).T.tocsr()
    except ValueError as exc:
        raise InputError(path, "matrix/indices", f"inconsistent sparse matrix: {exc}") from exc
    return barcodes, names, ids, types, counts


def _find(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise InputError(folder, stems[0], f"missing {' or '.join(s + '[.gz]' for s in stems)} in the matrix folder")


def _read_tsv(path: Path, field: str) -> pd.DataFrame:
    """A headerless TSV, gzipped or not whatever its name says (some tools write plain text
    to ``*.tsv.gz``, e.g. the VisiumIO Visium HD fixture); quoted fields are unquoted."""
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        return pd.read_csv(
            path, sep="\t", header=None, dtype=str, keep_default_na=False, compression="gzip" if gz else None
        )
    except (OSError, ValueError, pd.errors.ParserError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(path, field, f"cannot parse: {exc}") from exc


def read_10x_mtx(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """Read a 10x Matrix Market folder; same return value as :func:`read_10x_h5`."""
    mtx = _find(folder, ("matrix.mtx",))
    bc_file = _find(folder, ("barcodes.tsv",))
    feat_file = _find(folder, ("features.tsv", "genes.tsv"))
    try:
        if mtx.suffix == ".gz":
            with gzip.open(mtx, "rb") as fh:
                m = scipy.io.mmread(fh)
        else:
            m = scipy.io.mmread(mtx)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(mtx, "counts", f"not a readable Matrix Market file: {exc}") from exc
    barcodes = _read_tsv(bc_file, "barcodes")[0].to_numpy().astype(str)
    feats = _read_tsv(feat_file, "features")
    if feats.shape[1] < 2:
        raise InputError(feat_file, "features", "expected columns: feature id, feature name[, feature type]")
    ids, names = feats[0].to_numpy().astype(str), feats[1].to_numpy().astype(str)
    types = feats[2].to_numpy().astype(str) if feats.shape[1] >= 3 else np.full(len(names), GENE_EXPRESSION)
    if m.shape != (len(names), len(barcodes)):
        raise InputError(
            mtx,
            "counts",
            f"matrix is {m.shape[0]} x {m.shape[1]} but {feat_file.name} lists "
            f"{len(names)} features and {bc_file.name} {len(barcodes)} barcodes",
        )
    return barcodes, names, ids, types, sp.csr_matrix(m.T)


def read_counts(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """Read a 10x matrix (``.h5`` file or mtx folder), keep Gene Expression features and
    validate raw counts and unique barcodes.

    Returns (barcodes, gene symbols, gene ids, barcodes x genes CSR int64 raw counts).
    """
    if path.is_dir():
        barcodes, names, ids, types, counts = read_10x_mtx(path)
        count_file = _find(path, ("matrix.mtx",))
    else:
        barcodes, names, ids, types, counts = read_10x_h5(path)
        count_file = path
    gex = types == GENE_EXPRESSION
    if not gex.any():
        raise InputError(
            path, "features/feature_type", f"no '{GENE_EXPRESSION}' features (types: {sorted(set(types.tolist()))})"
        )
    if not gex.all():
        log.info(
            "%s: keeping %d '%s' features, dropping %d of types %s",
            path,
            gex.sum(),
            GENE_EXPRESSION,
            (~gex).sum(),
            sorted(set(types[~gex].tolist())),
        )
        counts = counts[:, np.flatnonzero(gex)]
    validate_counts(
        counts, count_file, "counts" if path.is_dir() else "matrix/data", row_names=barcodes, col_names=names[gex]
    )
    validate_unique(barcodes, path, "barcodes", "barcode")
    counts = counts.astype(np.int64)
    counts.eliminate_zeros()
    return barcodes, names[gex], ids[gex], counts
