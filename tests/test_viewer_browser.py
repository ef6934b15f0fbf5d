"""`stimage-embed view` in a real browser: headless Debian Chromium driven by Selenium, on a
store holding the real HER2ST section C5 with an ``nb`` run (trained on C4).

Loads the page, waits for the tiles, checks the canvas shows tissue, switches gene and checks
the overlay pixels change (and are the colours of the stored predictions on the shared
scale), clicks a spot and checks the panel's values against the store, then shows predicted
and measured side by side and saves screenshots. A missing browser fails under CI (the CI
variable set to anything but empty, 0, false, no) and skips elsewhere with one line.
``STIMAGE_VIEWER_SCREENSHOT=PATH`` also writes the side-by-side view there (how
docs/img/viewer.png is made).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from store_cases import cli_args, env
from test_viewer_api import SHOWN, measured_log1p
from test_viewer_labels import TAB10, build_label_store

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1500,900",
)
WAIT_S = 90


def under_ci() -> bool:
    """Whether the CI variable is set (any value but empty, 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _browser_or_skip() -> tuple[str, str]:
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which(DRIVER)
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    msg = "headless browser missing: install Debian chromium and chromium-driver, and selenium (scripts/setup.sh)"
    if under_ci():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    d.set_page_load_timeout(WAIT_S)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_store):
    """`stimage-embed view --port 0` on the store (a subprocess); yields (base URL, Store, nb run
    id, label run id, C5's observed classes by spot)."""
    import httpx

    store, run_id, label_run, truth = build_label_store(tmp_path_factory, embedded_store)
    proc = subprocess.Popen(
        cli_args("view", "--store", str(store.path), "--port", "0"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        base = found.group(0)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/api/slides", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base, store, run_id, label_run, truth
    finally:
        proc.terminate()
        proc.wait(30)


def wait_ready(d, gene: str | None = None) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    cond = "return !!(window.stviewer && window.stviewer.ready()"
    cond += f" && window.stviewer.state.values && window.stviewer.state.values.gene === {gene!r})" if gene else ")"
    WebDriverWait(d, WAIT_S, poll_frequency=0.2).until(lambda drv: drv.execute_script(cond))
    # two animation frames: the last tiles are drawn on the canvas
    d.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));")


def shot(d, element_id: str) -> np.ndarray:
    el = d.find_element("id", element_id)
    return np.asarray(Image.open(BytesIO(el.screenshot_as_png)).convert("RGB")).astype(np.int16)


def set_opacity(d, percent: int) -> None:
    d.execute_script(
        "const r = document.getElementById('opacity'); r.value = arguments[0];r.dispatchEvent(new Event('input'));",
        percent,
    )
    d.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));")


def tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels that look like H&E tissue: not white background, pink to purple
    (red and blue above green)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(((rgb.mean(-1) < 225) & (r > g + 10) & (b > g + 5)).mean())


def viridis_index(rgb: np.ndarray) -> np.ndarray:
    """Nearest viridis index (0-255) of each colour (matplotlib's map as the reference)."""
    import matplotlib

    lut = np.asarray(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256)))[:, :3] * 255
    return np.argmin(((rgb[:, None, :] - lut[None]) ** 2).sum(-1), axis=1)


def spot_pixels(d, img: np.ndarray, spot_ids: list[str]) -> np.ndarray:
    """The screenshot's colour at each spot centre (3x3 median), CSS px = screenshot px."""
    out = []
    for sid in spot_ids:
        p = d.execute_script("return window.stviewer.spotPoint(arguments[0], 'a');", sid)
        x, y = int(round(p["x"])), int(round(p["y"]))
        out.append(np.median(img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3), axis=0))
    return np.asarray(out)


def click_at(d, p: dict) -> None:
    """Click viewer "a" at CSS px ``p`` (relative to its top-left)."""
    from selenium.webdriver.common.action_chains import ActionChains

    el = d.find_element("id", "view-a")
    ActionChains(d).move_to_element_with_offset(
        el, int(p["x"] - el.size["width"] / 2), int(p["y"] - el.size["height"] / 2)
    ).click().perform()


def wait_text(d, css: str, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, WAIT_S).until(
        lambda drv: drv.find_elements("css selector", css) and drv.find_element("css selector", css).text == text
    )


def stored_predictions(store, run_id: str, gene: str) -> dict[str, float]:
    p = pl.from_arrow(store.read("predictions", ["run_id", "slide_id", "spot_id", "gene", "mean_log1p"]))
    p = p.filter((pl.col("run_id") == run_id) & (pl.col("slide_id") == SHOWN) & (pl.col("gene") == gene))
    return dict(zip(p["spot_id"].to_list(), p["mean_log1p"].to_list()))


def test_viewer_in_browser(driver, server, tmp_path):
    import httpx
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, store, run_id, _, _ = server
    genes = next(r["genes"] for r in store.read("runs", ["run_id", "genes"]).to_pylist() if r["run_id"] == run_id)
    g1, g2 = genes[0], genes[1]
    driver.get(f"{base}/?slide={SHOWN}&run={run_id}&gene={g1}")
    wait_ready(driver, g1)

    # the canvas shows tissue: with the overlay hidden, a real share of H&E-coloured pixels
    set_opacity(driver, 0)
    bare = shot(driver, "view-a")
    assert bare.shape[0] > 300 and tissue_fraction(bare) > 0.10, tissue_fraction(bare)
    assert bare.std() > 15

    # overlay of g1: spot centres carry the viridis colour of the stored prediction on the shared scale
    set_opacity(driver, 100)
    first = shot(driver, "view-a")
    pred1 = stored_predictions(store, run_id, g1)
    meas1 = measured_log1p(store, SHOWN, g1)
    both = [v for k in pred1 for v in (pred1[k], meas1[k])]
    lo, hi = min(both), max(both)
    ids = sorted(pred1)[::9]
    want = np.clip(np.round([(pred1[k] - lo) / (hi - lo) * 255 for k in ids]), 0, 255)
    got = viridis_index(spot_pixels(driver, first, ids).astype(float))
    assert np.median(np.abs(got - want)) <= 12, list(zip(want, got))

    # switch gene: the overlay pixels change where the spots are
    Select(driver.find_element("id", "gene")).select_by_value(g2)
    wait_ready(driver, g2)
    second = shot(driver, "view-a")
    changed = np.abs(second - first).sum(-1) > 30
    assert changed.mean() > 0.02, changed.mean()
    assert "gene=" + g2 in driver.current_url and f"slide={SHOWN}" in driver.current_url
    assert re.search(r"[?&]z=[0-9.]+", driver.current_url)

    # click a spot: the panel shows its id and the store's values
    pred2, meas2 = stored_predictions(store, run_id, g2), measured_log1p(store, SHOWN, g2)
    target = max(pred2, key=pred2.get)
    p = driver.execute_script("return window.stviewer.spotPoint(arguments[0], 'a');", target)
    click_at(driver, p)
    cell = "#spot-info td[data-field='{}']"
    wait_text(driver, cell.format("spot_id"), target)
    shown_pred = float(driver.find_element("css selector", cell.format("predicted")).get_attribute("data-value"))
    shown_meas = float(driver.find_element("css selector", cell.format("measured")).get_attribute("data-value"))
    assert shown_pred == pytest.approx(pred2[target], rel=1e-6)
    assert shown_meas == pytest.approx(meas2[target], rel=1e-5)
    # its similar spots on the other slide, with thumbnails (loaded) and links
    links = "#similar a"
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements("css selector", links)) == 5)
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#similar img')].every((i) => i.complete && i.naturalWidth > 0);"
        )
    )
    hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", links)]
    assert all("slide=C4" in h for h in hrefs)
    (tmp_path / "viewer_click.png").write_bytes(driver.get_screenshot_as_png())
    similar_href = hrefs[0]

    # predicted | measured side by side, one colour scale; the shared URL restores the view
    driver.find_element("id", "sbs").click()
    wait_ready(driver, g2)
    left, right = shot(driver, "view-a"), shot(driver, "view-b")
    assert left.shape == right.shape and np.abs(left - right).sum(-1).__gt__(30).mean() > 0.01
    assert "predicted and measured" in driver.find_element("id", "legend").text
    png = driver.get_screenshot_as_png()
    (tmp_path / "viewer_side_by_side.png").write_bytes(png)
    assert Image.open(BytesIO(png)).size[0] >= 1000
    if os.environ.get("STIMAGE_VIEWER_SCREENSHOT"):
        Path(os.environ["STIMAGE_VIEWER_SCREENSHOT"]).write_bytes(png)
    url = driver.current_url
    driver.get(url)
    wait_ready(driver, g2)
    assert driver.execute_script("return window.stviewer.state.sbs") is True
    assert driver.find_element("id", "gene").get_attribute("value") == g2
    for key in "xyz":  # the viewport (centre, zoom) as the URL recorded it
        before, after = (float(re.search(rf"[?&]{key}=([0-9.]+)", u).group(1)) for u in (url, driver.current_url))
        assert after == pytest.approx(before, rel=1e-3, abs=1e-4), key

    # a similar spot's link opens its slide centred on it (C4: no predictions of this run)
    driver.get(similar_href)
    wait_ready(driver)
    spot = re.search(r"[?&]spot=([^&]+)", similar_href).group(1)
    at = httpx.get(f"{base}/api/slides/C4/spots/{spot}").json()
    centre = driver.execute_script(
        "const v = window.stviewer.viewers.a; const c = v.world.getItemAt(0).viewportToImageCoordinates("
        "v.viewport.getCenter(true)); return [c.x, c.y, window.stviewer.state.slide];"
    )
    assert centre[2] == "C4" and np.hypot(centre[0] - at["pixel_x"], centre[1] - at["pixel_y"]) < at["radius_px"]


def test_label_run_in_browser(driver, server, tmp_path):
    """A label run picked by URL: the class picker, the predicted-class layer's spot colours
    are the tab10 colours of the stored classes, a click shows the stored classes."""
    base, store, _, label_run, truth = server
    driver.get(f"{base}/?slide={SHOWN}&run={label_run}&gene=mid&layer=label")
    wait_ready(driver, "mid")
    assert driver.find_element("id", "gene-label").text == "Class"
    assert driver.execute_script("return window.stviewer.state.layer") == "label"
    assert all(c in driver.find_element("id", "legend").text for c in TAB10)
    set_opacity(driver, 100)
    img = shot(driver, "view-a")
    rows = pl.from_arrow(store.read("label_predictions")).filter(
        (pl.col("run_id") == label_run) & (pl.col("class") == "mid")
    )
    label = dict(zip(rows["spot_id"].to_list(), rows["label"].to_list()))
    ids = sorted(label)[::7]
    ref = np.array([TAB10[c] for c in TAB10])
    got = spot_pixels(driver, img, ids).astype(float)
    nearest = np.array(list(TAB10))[np.argmin(((got[:, None] - ref[None]) ** 2).sum(-1), axis=1)]
    assert (nearest == np.array([label[k] for k in ids])).mean() > 0.9
    target = ids[len(ids) // 2]
    p = driver.execute_script("return window.stviewer.spotPoint(arguments[0], 'a');", target)
    click_at(driver, p)
    cell = "#spot-info td[data-field='{}']"
    wait_text(driver, cell.format("spot_id"), target)
    assert driver.find_element("css selector", cell.format("label")).text == label[target]
    assert driver.find_element("css selector", cell.format("observed_label")).text == truth[target]
    prob = rows.filter(pl.col("spot_id") == target)["prob"][0]
    assert float(driver.find_element("css selector", cell.format("prob_class")).get_attribute("data-value")) == (
        pytest.approx(prob, rel=1e-6)
    )
    (tmp_path / "viewer_label_run.png").write_bytes(driver.get_screenshot_as_png())
