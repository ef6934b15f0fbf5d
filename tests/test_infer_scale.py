"""The scale of an image for ``infer`` (issue 25, item 8): read from the file when it carries
one (OpenSlide's mpp, a TIFF/PNG resolution tag), a given ``--um-per-px`` that differs by more
than 20 % is a warning naming both values, and the missing-scale error says where to find one.

Images are crops of the real HER2ST C5 section (0.69 µm/px is a typical 20x scan)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from stimage_embed.errors import InputError
from stimage_embed.inference.scale import raster_um_per_px
from stimage_embed.inference.slide_from_image import read_image

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def crop(real_data_root) -> np.ndarray:
    full = imagecodecs.imread(str(real_data_root / "her2st/images/C5.jpg"))
    return np.ascontiguousarray(full[4000:5024, 4000:5024])


def _save(rgb: np.ndarray, path: Path, **kw) -> Path:
    Image.fromarray(rgb).save(path, **kw)
    return path


def test_resolution_tags_give_the_scale_and_screen_defaults_are_ignored(crop, tmp_path):
    um = 0.69
    tif = _save(crop, tmp_path / "a.tif", resolution=1e4 / um, resolution_unit=3)  # pixels per cm
    png = _save(crop, tmp_path / "a.png", dpi=(25_400 / um, 25_400 / um))
    jpg = _save(crop, tmp_path / "a.jpg", dpi=(72, 72))  # a screen default: 353 µm/px
    assert raster_um_per_px(tif) == pytest.approx(um, rel=1e-6)
    assert raster_um_per_px(png) == pytest.approx(um, rel=1e-2)  # pHYs stores whole pixels per metre
    assert raster_um_per_px(jpg) is None


def test_a_given_scale_far_from_the_files_is_a_warning(crop, tmp_path, caplog):
    """Before: ``--um-per-px 0.25`` on a 0.69 µm/px image was accepted silently."""
    tif = _save(crop, tmp_path / "a.tif", resolution=1e4 / 0.69, resolution_unit=3)
    with caplog.at_level(logging.WARNING, logger="stimage_embed"):
        info = read_image(tif, um_per_px=0.25)
    assert info.um_per_px == 0.25 and info.um_per_px_source == "argument"
    warned = [r.getMessage() for r in caplog.records if "differs by" in r.getMessage()]
    assert len(warned) == 1 and "0.25" in warned[0] and "0.69" in warned[0] and "64 %" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stimage_embed"):
        read_image(tif, um_per_px=0.72)  # 4 % off: not a warning
    assert not [r for r in caplog.records if "differs by" in r.getMessage()]
    assert read_image(tif).um_per_px == pytest.approx(0.69) and read_image(tif).um_per_px_source == "metadata"


def test_a_pyramidal_tiff_scale_is_compared_too(crop, tmp_path, caplog):
    from fixtures_formats import write_pyramidal_tiff

    tif = write_pyramidal_tiff(tmp_path / "p.tif", crop, 0.69, n_levels=2)
    with caplog.at_level(logging.WARNING, logger="stimage_embed"):
        read_image(tif, um_per_px=0.25)
    assert any("differs by 64 %" in r.getMessage() for r in caplog.records)


def test_the_missing_scale_error_says_where_to_find_one(crop, tmp_path):
    jpg = _save(crop, tmp_path / "a.jpg")
    with pytest.raises(InputError, match="--um-per-px") as err:
        read_image(jpg)
    assert "openslide-show-properties" in str(err.value) and "scale bar" in str(err.value)
