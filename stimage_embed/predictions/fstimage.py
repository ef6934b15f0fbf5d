"""FSTimage: the ``nb`` predictions of several backbones averaged per (slide, spot), from
their stored long predictions (no vectors are read and nothing is fitted)."""

from __future__ import annotations

import numpy as np
import polars as pl

from heads import NegativeBinomial, combine_predictions, log1p_to_rate, rate_to_log1p
from heads.outputs import quantile_columns
from stimage_embed.errors import InputError
from stimage_embed.predictions.arrays import SpotArrays
from stimage_embed.predictions.runner import long_predictions


def _wide(df: pl.DataFrame, column: str, genes: list[str]) -> pl.DataFrame:
    return (
        df.pivot(on="gene", index=["slide_id", "spot_id"], values=column)
        .sort("slide_id", "spot_id")
        .select("slide_id", "spot_id", *genes)
    )


def _truth(
    per_backbone: dict[str, pl.DataFrame], keys: pl.DataFrame, genes: list[str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The measured counts and library sizes of ``keys`` from the members' rows, or
    ``(None, None)`` when some spot has none (an image-only slide)."""
    truth = pl.concat(
        [
            df.select("slide_id", "spot_id", "observed", "library_size").unique(["slide_id", "spot_id"])
            for df in per_backbone.values()
        ]
    ).unique(["slide_id", "spot_id"])
    lib = keys.join(truth, on=["slide_id", "spot_id"], how="left", maintain_order="left")["library_size"]
    if lib.null_count():
        return None, None
    obs = keys.join(
        pl.concat([df.select("slide_id", "spot_id", "gene", "observed") for df in per_backbone.values()])
        .unique(["slide_id", "spot_id", "gene"])
        .pivot(on="gene", index=["slide_id", "spot_id"], values="observed"),
        on=["slide_id", "spot_id"],
        how="left",
        maintain_order="left",
    )
    return obs.select(genes).to_numpy().astype(np.int64), lib.to_numpy().astype(np.float64)


def combine_backbones(per_backbone: dict[str, pl.DataFrame], missing: str = "error") -> pl.DataFrame:
    """FSTimage: average the ``nb`` predictions of several backbones, aligned by (slide, spot).

    Metric scale: ``mean_log1p = log1p(average of the backbones' rates * 1e4)`` (each
    backbone's rate is ``expm1(mean_log1p) / 1e4``), from the image vectors only. Count
    scale (coverage only), via :func:`heads.combine_predictions`: ``mean`` = average of the
    backbones' NB means, ``epistemic`` = between-backbone variance of the means,
    ``aleatoric`` = mean of the backbones' NB variances, ``variance`` = their sum.
    ``missing``: "error" | "drop" | "available" for spots absent from some backbone.
    """
    genes = None
    wide, rates = {}, {}
    for bb, df in per_backbone.items():
        g = df["gene"].unique(maintain_order=True).to_list()
        if genes is not None and sorted(g) != sorted(genes):
            raise InputError(
                None, "fstimage", f"backbone {bb!r} was predicted on other genes than {list(per_backbone)[0]!r}"
            )
        genes = genes or g
        m, v, r = (_wide(df, c, genes) for c in ("mean", "variance", "mean_log1p"))
        keys = m.select("slide_id", "spot_id").to_numpy()
        wide[bb] = (keys, m.select(genes).to_numpy(), v.select(genes).to_numpy())
        rates[bb] = (keys, log1p_to_rate(r.select(genes).to_numpy()))
    try:
        comb = combine_predictions(wide, missing=missing)
        rate = combine_predictions(rates, missing=missing)
    except ValueError as exc:
        raise InputError(None, "--missing", str(exc)) from exc
    keys = pl.DataFrame({"slide_id": comb.keys[:, 0].astype(str), "spot_id": comb.keys[:, 1].astype(str)})
    counts, lib = _truth(per_backbone, keys, genes)
    arrays = SpotArrays(
        keys=keys, X=np.zeros((len(keys), 0), np.float32), counts=counts, library_size=lib, genes=genes, provenance={}
    )
    alea = comb.aleatoric if comb.aleatoric is not None else np.zeros_like(comb.mean)
    var = comb.spread + alea
    cols = {
        "mean": comb.mean,
        "mean_log1p": rate_to_log1p(rate.mean),
        "variance": var,
        "epistemic": comb.spread,
        "aleatoric": alea,
        **quantile_columns(NegativeBinomial.from_moments(comb.mean, var)),
    }
    return long_predictions(arrays, genes, cols)
