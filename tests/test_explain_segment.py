"""Nuclei segmentation (``hed``) and morphology: a synthetic H&E-like image with drawn nuclei
of known sizes and positions (synthetic), and a real HER2ST tile (plausible bounds)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from skimage.color import hed2rgb
from skimage.measure import regionprops

from stimage_embed.explain.morphology import TileFrame, measure_nuclei
from stimage_embed.explain.segment import HedSegmenter, SegmenterUnavailable, get_segmenter

UM_PER_PX = 0.5  # synthetic tile: µm per px
#: synthetic nuclei: (x µm, y µm, semi-axis a µm, semi-axis b µm); two of them touch
NUCLEI = [
    (15.0, 15.0, 3.0, 3.0),
    (50.0, 18.0, 4.0, 4.0),
    (85.0, 20.0, 5.0, 3.5),
    (20.0, 60.0, 6.0, 4.5),
    (60.0, 55.0, 3.5, 3.5),
    (90.0, 70.0, 4.5, 4.5),
    (30.0, 95.0, 4.0, 4.0),
    (37.5, 95.0, 4.0, 4.0),  # touches the previous one (centres 7.5 µm apart, radii 4 µm)
]


def synthetic_tile(nuclei=NUCLEI, size_um: float = 110.0, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """An H&E-like RGB tile (hed2rgb of eosin background + haematoxylin ellipses, noise) and each nucleus's mask."""
    n = int(size_um / UM_PER_PX)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * UM_PER_PX
    rng = np.random.default_rng(seed)
    hed = np.zeros((n, n, 3))
    hed[..., 1] = 0.04 + rng.normal(0, 0.004, (n, n))
    masks = []
    for x, y, a, b in nuclei:
        m = ((xx - x) / a) ** 2 + ((yy - y) / b) ** 2 <= 1
        masks.append(m)
        hed[m, 0] = 0.15 + rng.normal(0, 0.01, m.sum())
        hed[m, 1] = 0.005
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8), masks


def test_synthetic_nuclei_count_centroids_areas():
    tile, masks = synthetic_tile()
    labels = HedSegmenter().segment(tile, UM_PER_PX)
    frame = TileFrame(0.0, 0.0, 1.0, UM_PER_PX)  # tile px = level-0 px
    table = measure_nuclei(tile, labels, frame)
    assert table.height == len(NUCLEI)  # count exact, the touching pair split by the watershed
    got = table.select("centroid_x_um", "centroid_y_um").to_numpy()
    for (x, y, a, b), mask in zip(NUCLEI, masks):
        d = np.hypot(got[:, 0] - x, got[:, 1] - y)
        j = int(d.argmin())
        assert d[j] < 1.0  # centroid within 1 µm (2 px)
        true_area = mask.sum() * UM_PER_PX**2  # the drawn disc, rasterised
        assert table["area_um2"][j] == pytest.approx(true_area, rel=0.2)  # area within 20 %
        assert table["area_um2"][j] == pytest.approx(np.pi * a * b, rel=0.25)
    # morphology against skimage's regionprops on the same labels (independent units check)
    props = regionprops(labels)
    assert np.allclose(table["perimeter_um"].to_numpy(), [p.perimeter * UM_PER_PX for p in props])
    ecc = table.sort("centroid_x_um")["eccentricity"]
    assert ecc.min() >= 0 and ecc.max() < 1
    assert (table["mean_h"] > table["mean_e"]).all()  # nuclei: haematoxylin-rich


def test_centroid_in_level0_px_of_a_resampled_tile():
    tile, _ = synthetic_tile(nuclei=[(40.0, 60.0, 4.0, 4.0)])
    labels = HedSegmenter().segment(tile, UM_PER_PX)
    # the tile was resampled from a window of 2x its px, centred on level-0 (1000, 2000), 0.25 µm/px
    frame = TileFrame.centred(1000.0, 2000.0, 2 * tile.shape[0], tile.shape[0], 0.25)
    row = measure_nuclei(tile, labels, frame).row(0, named=True)
    assert row["centroid_x_px"] == pytest.approx(1000.0 - tile.shape[0] + 40.0 / UM_PER_PX * 2, abs=2)
    assert row["centroid_y_um"] == pytest.approx(row["centroid_y_px"] * 0.25)
    assert row["area_um2"] == pytest.approx(np.pi * 16, rel=0.2)


def test_no_nucleus_and_bad_input():
    tile, _ = synthetic_tile(nuclei=[])
    assert HedSegmenter().segment(tile, UM_PER_PX).max() == 0
    assert HedSegmenter().segment(np.full((64, 64, 3), 255, np.uint8), UM_PER_PX).max() == 0
    with pytest.raises(ValueError, match="uint8"):
        HedSegmenter().segment(tile.astype(float), UM_PER_PX)


def test_size_limits_in_um2():
    tile, _ = synthetic_tile(nuclei=[(20.0, 20.0, 1.5, 1.5), (60.0, 60.0, 5.0, 5.0)])
    labels = HedSegmenter(min_area_um2=12.0).segment(tile, UM_PER_PX)
    assert labels.max() == 1  # the 7 µm² speck is dropped
    assert HedSegmenter(max_area_um2=50.0).segment(tile, UM_PER_PX).max() == 0  # the 78 µm² nucleus too


def test_pluggable_segmenters_say_when_unavailable(tmp_path):
    assert get_segmenter("hed").name == "hed"
    with pytest.raises(SegmenterUnavailable, match="weights not found"):
        get_segmenter("cellpose", tmp_path / "missing.pt")
    with pytest.raises(SegmenterUnavailable, match="no weights given"):
        get_segmenter("stardist")
    with pytest.raises(SegmenterUnavailable, match="unknown segmenter"):
        get_segmenter("nope")


def test_real_her2st_tile_count_and_sizes(real_data_root):
    """A 100 µm HER2ST spot tile (C5, tumour-rich region) holds tens of nuclei of 15-150 µm²
    (lymphocytes ~5-7 µm across = 20-40 µm², tumour nuclei ~8-14 µm = 50-150 µm²)."""
    from stimage_embed.tiles.image import SlideImage

    sel = pl.read_csv(real_data_root / "her2st/spots/C5_selection.tsv", separator="\t").filter(pl.col("selected") == 1)
    um = 0.687  # C5's µm/px as ingest estimates it from the spot lattice (README: ~0.69)
    counts, medians, darker = [], [], []
    with SlideImage.open(real_data_root / "her2st/images/C5.jpg") as img:
        for i in (0, 50, 100, 150):
            r = sel.row(i, named=True)
            tile, _ = img.read_window(r["pixel_x"], r["pixel_y"], 100 / um, 224, "bicubic")
            labels = HedSegmenter().segment(tile, 100 / 224)
            t = measure_nuclei(tile, labels, TileFrame.centred(r["pixel_x"], r["pixel_y"], 100 / um, 224, um))
            counts.append(t.height)
            medians.append(t["area_um2"].median())
            # nuclei are haematoxylin-dense: each segment darker (mean grey) than the tile's non-nucleus median
            grey = tile.mean(axis=-1)
            seg_grey = np.array([grey[labels == k].mean() for k in range(1, labels.max() + 1)])
            darker.append(float(np.mean(seg_grey < np.median(grey[labels == 0]))))
    # a 100 µm disc of cellular tissue holds ~20-150 nuclei; every tile here is tissue
    assert all(10 <= c <= 150 for c in counts), counts
    assert all(15 <= m <= 150 for m in medians), medians
    assert all(d == 1.0 for d in darker), darker  # no pale background blob taken for a nucleus
