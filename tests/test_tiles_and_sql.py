"""Physical tiles (size checked against the spot pitch), big images, and DuckDB SQL over
float16 vector tables."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from stimage_embed.errors import InputError
from stimage_embed.store import Store
from stimage_embed.store import schema as S
from stimage_embed.tiles.image import SlideImage, padded_fraction
from stimage_embed.tiles.window import TileGeometry, TileReader


def _dot_image(xs, ys, shape, radius):
    """White canvas with a black dot at every spot centre (level-0 px)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape + (3,), 255, np.uint8)
    for x, y in zip(xs, ys):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = 0
    return img


@pytest.mark.parametrize("tile_um", [100.0, 55.0])
def test_tiles_have_the_right_physical_size(tmp_path, ingested_store, tile_um):
    """Draw dots at the real HER2ST C5 spot centres; a tile of 4 x pitch (800 µm) centred on
    a spot must show its grid neighbours exactly at the tile's quarter points, and the
    100/55 µm tile window must be tile_um / pitch of the neighbour distance."""
    spots = ingested_store.sql("SELECT pixel_x, pixel_y, array_col, array_row FROM spots WHERE slide_id = 'C5'")
    umpp = ingested_store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    # the pitch in px, measured from the spots themselves: distance between spots one array
    # column apart in the same row (200 µm on legacy ST), median over all such pairs
    xy = spots.select("pixel_x", "pixel_y").to_numpy()
    cols = spots["array_col"].to_numpy()
    rows = spots["array_row"].to_numpy()
    pairs = [(i, j) for i in range(len(cols)) for j in np.flatnonzero((cols == cols[i] + 1) & (rows == rows[i]))]
    assert len(pairs) > 50
    pitch_px = np.median([np.hypot(*(xy[j] - xy[i])) for i, j in pairs])
    geom = TileGeometry(tile_um, 224)
    assert geom.window_px(umpp) / pitch_px == pytest.approx(tile_um / 200.0, rel=0.02)

    # content check at 800 µm = 4 pitches: grid neighbours land 1/4 of the tile from its centre
    x0, y0 = xy.min(0) - 800
    local = xy - [x0, y0]
    shape = tuple(int(v) for v in (local.max(0) + 800)[::-1])
    path = tmp_path / "dots.png"
    Image.fromarray(_dot_image(local[:, 0], local[:, 1], shape, radius=12)).save(path)
    with SlideImage.open(path) as img:
        reader = TileReader(img, umpp, TileGeometry(800.0, 200, "bilinear"))
        # 800 µm = 4 pitches over 200 px: one pitch is 50 px in the tile, on average
        scale = 200 / (800.0 / umpp)
        assert np.median([np.hypot(*(local[j] - local[i])) * scale for i, j in pairs]) == pytest.approx(50.0, rel=0.02)
        for i, j in pairs[:10]:
            tile, pad = reader.read(*local[i])
            dark = tile.mean(-1) < 128
            # dots are 12 px = ~2 tile px in radius; the tile centre is the corner of pixels 99/100
            assert dark[99:101, 99:101].all()  # the spot's own dot at the tile centre
            dx, dy = (local[j] - local[i]) * scale  # its neighbour, where the geometry puts it
            assert dark[int(np.floor(100 + dy)), int(np.floor(100 + dx))]
            assert not dark[int(np.floor(100 + dy / 2)), int(np.floor(100 + dx / 2))]  # background between


def test_padding_past_the_edge_is_recorded(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(path)
    with SlideImage.open(path) as img:
        tile, pad = img.read_window(0.0, 50.0, 40.0, 40)
        assert pad == pytest.approx(0.5)
        assert padded_fraction(-20, 30, 40, 200, 100) == pytest.approx(0.5)
        assert (tile[:, :18] == 255).all() and (tile[:, 22:] == 0).all()
        with pytest.raises(InputError, match="entirely outside"):
            img.read_window(1000.0, 1000.0, 40.0, 40)


def test_big_jpeg_is_read_deliberately_not_by_pils_bomb_guard(tmp_path):
    """A 200-megapixel JPEG (above PIL's 179 MP hard limit) opens under our explicit budget,
    and a budget that is too small gives a clear error naming the file."""
    import imagecodecs

    w, h = 20000, 10000
    arr = np.full((h, w, 3), 240, np.uint8)
    arr[5000:5100, 10000:10100] = (120, 40, 160)
    path = tmp_path / "big.jpg"
    path.write_bytes(imagecodecs.jpeg8_encode(arr, level=80))
    del arr
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with SlideImage.open(path) as img:
        assert (img.width, img.height) == (w, h)
        tile, _ = img.read_window(10050, 5050, 50, 10)
        assert tile.mean(axis=(0, 1))[1] < 80  # the purple square, not the background
    with pytest.raises(InputError, match="big.jpg.*max_pixels"):
        SlideImage.open(path, max_pixels=10_000_000)


def test_pyramidal_tiff_reads_from_the_nearest_level(tmp_path):
    import tifffile

    base = np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(base, tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(base[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1, compression="zlib")
        tif.write(base[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1, compression="zlib")
    with SlideImage.open(path) as img:
        assert img.backend.startswith("openslide")
        assert img.level_downsamples == pytest.approx([1, 2, 4])
        assert img.best_level(400 / 100) == 2 and img.best_level(1.5) == 0
        tile, _ = img.read_window(1024.0, 1024.0, 400.0, 100, "nearest")
        assert tile.shape == (100, 100, 3)


def test_sql_over_float16_vector_tables(tmp_path, ingested_store):
    """DuckDB cannot scan float16 Arrow columns; the store casts them so joins just work."""
    store = Store(tmp_path / "s")
    spots = ingested_store.read("spots").to_pandas()
    c5 = spots[spots.slide_id == "C5"]
    store.db.create_table("spots", pa.Table.from_pandas(c5, preserve_index=False).cast(S.SPOTS), schema=S.SPOTS)
    dim = 8
    vec = np.arange(len(c5) * dim, dtype=np.float16).reshape(-1, dim) / 64
    emb = pa.table(
        {
            "slide_id": c5.slide_id.tolist(),
            "spot_id": c5.spot_id.tolist(),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float16()), dim),
            "tissue_fraction": pa.array(c5.tissue_fraction, pa.float32()),
            "padded_fraction": pa.array(c5.padded_fraction, pa.float32()),
            "tile_um": pa.array([100.0] * len(c5), pa.float32()),
            "um_per_px": pa.array([0.69] * len(c5), pa.float32()),
            "provenance_id": ["p"] * len(c5),
        },
        schema=S.embedding_schema(dim),
    )
    store.db.create_table("embeddings_toy", emb, schema=S.embedding_schema(dim))
    # a query that never touches the vector column
    n = store.sql("SELECT COUNT(*) AS n FROM embeddings_toy e JOIN spots s USING (slide_id, spot_id)")
    assert n["n"][0] == len(c5)
    # and one that does: vectors come back as float32, equal to the stored halves
    df = store.sql("SELECT spot_id, vector, list_sum(vector::FLOAT[]) AS s FROM embeddings_toy ORDER BY spot_id")
    ref = dict(zip(c5.spot_id, vec.astype(np.float32)))
    assert df.schema["vector"] == pl.Array(pl.Float32, dim)
    got = df["vector"].to_numpy()
    assert np.array_equal(got, np.stack([ref[s] for s in df["spot_id"]]))
    assert np.allclose(df["s"], got.sum(1), rtol=1e-6)
