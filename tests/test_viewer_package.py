"""What the viewer ships and how it serves tiles, checked without a store:

* every static file (OpenSeadragon's build, its licence and version record, the page) is
  matched by the wheel's package-data globs in pyproject.toml, and the page loads nothing
  from the network;
* the recorded OpenSeadragon version is the one in the shipped build's banner;
* the per-slide tile cache returns the bytes an uncached read returns, stays within its
  bound, and 8 threads reading an OpenSlide TIFF at once get the bytes of a serial read;
* a missing browser skips the browser test with one line, and fails it under CI.
"""

from __future__ import annotations

import ast
import fnmatch
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "stimage_embed" / "viewer" / "static"


def test_static_files_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()  # (Python 3.10: no tomllib) the one package-data line
    section = text.split("[tool.setuptools.package-data]", 1)[1]
    patterns = ast.literal_eval(re.search(r'^"stimage_embed\.viewer" = (\[.*\])$', section, flags=re.M).group(1))
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert len(files) > 10
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in patterns)]
    assert not missing, missing
    for name in ("openseadragon/openseadragon.min.js", "openseadragon/LICENSE.txt", "openseadragon/VERSION"):
        assert (STATIC / name).is_file(), name


def test_openseadragon_version_and_licence_recorded():
    record = (STATIC / "openseadragon" / "VERSION").read_text()
    version = re.match(r"openseadragon (\d+\.\d+\.\d+)\n", record).group(1)
    banner = (STATIC / "openseadragon" / "openseadragon.min.js").read_text()[:2000]
    assert f"//! openseadragon {version}" in banner and f'versionStr:"{version}"' in banner
    assert "BSD-3-Clause" in record and re.search(r"sha256: [0-9a-f]{64}", record)
    licence = (STATIC / "openseadragon" / "LICENSE.txt").read_text()
    assert "Redistribution and use in source and binary forms" in licence


def test_page_fetches_nothing_from_the_network():
    for name in ("index.html", "viewer.js", "viewer.css"):
        text = (STATIC / name).read_text()
        code = re.sub(r"^\s*//.*$", "", text, flags=re.M)  # comments may name sites
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", code, flags=re.I), name


@pytest.fixture(scope="module")
def tiled_tiff(tmp_path_factory, real_data_root) -> Path:
    """A 2200 x 2300 px crop of the real HER2ST C5 section as a tiled TIFF (OpenSlide reads it)."""
    import imagecodecs
    import tifffile

    full = imagecodecs.imread(str(real_data_root / "her2st/images/C5.jpg"))
    path = tmp_path_factory.mktemp("tiles") / "crop.tif"
    tifffile.imwrite(path, np.ascontiguousarray(full[2500:4700, 2000:4300]), tile=(256, 256), photometric="rgb")
    return path


def test_tile_cache_equals_uncached_reads_and_is_thread_safe(tiled_tiff):
    from stimage_embed.viewer.deepzoom import SlideTiles

    cached, plain = SlideTiles(tiled_tiff, tile_cache=16), SlideTiles(tiled_tiff, tile_cache=0)
    assert cached.backend.startswith("openslide")
    top = cached.dz.level_count - 1
    tiles = [(lv, c, r) for lv in (top, top - 1) for c in range(cached.dz.level_tiles[lv][0]) for r in range(3)]
    want = {t: plain.tile_jpeg(*t) for t in tiles}
    assert len(set(want.values())) == len(tiles)  # distinct tiles, distinct bytes
    order = tiles * 3
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: (t, cached.tile_jpeg(*t)), order))
    assert all(body == want[t] for t, body in got)
    assert len(cached._jpegs) == 16
    t = tiles[0]
    assert cached.tile_jpeg(*t) is cached.tile_jpeg(*t)  # the second read is the cached bytes
    with ThreadPoolExecutor(8) as pool:  # no cache: concurrent OpenSlide reads equal serial ones
        assert list(pool.map(lambda t: plain.tile_jpeg(*t), order)) == [want[t] for t in order]
    cached.close()
    plain.close()


def test_missing_browser_skips_with_one_line_and_fails_under_ci(monkeypatch):
    import test_viewer_browser as tvb

    monkeypatch.setattr(tvb.shutil, "which", lambda name: None)
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception) as info:
            tvb._browser_or_skip()
        assert "\n" not in str(info.value) and "chromium" in str(info.value)
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception):
            tvb._browser_or_skip()
