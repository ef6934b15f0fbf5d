"""The viewer's web app (FastAPI): the page, its static files (OpenSeadragon shipped in the
package), deep-zoom tiles, overlay tiles and the JSON endpoints (see docs/viewer.md).

Errors: an unknown slide, run, gene or tile gets a 404 whose JSON ``detail`` is one line;
malformed parameters a 400 with one line; never a traceback.
"""

from __future__ import annotations

import io
import logging
import math
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from stimage_embed.errors import InputError
from stimage_embed.store.store import Store
from stimage_embed.viewer import label_queries, queries
from stimage_embed.viewer.cache import LRU
from stimage_embed.viewer.deepzoom import SlideTiles
from stimage_embed.viewer.overlay import LAYERS, SpotLayers, png_bytes
from stimage_embed.viewer.similar import NoVector, similar

log = logging.getLogger(__name__)

#: seconds overlay tiles reuse a run's values before reading the store again (the values
#: endpoint, which the page calls before drawing, always reads the store and refreshes them)
VALUES_TTL = 60.0
#: open slide images kept (a decoded JPEG/PNG section holds its pixels in memory)
OPEN_SLIDES = 3
TILE_HEADERS = {"Cache-Control": "max-age=300"}
THUMB_PX = 96


def static_dir() -> Path:
    return Path(str(resources.files("stimage_embed.viewer") / "static"))


class Viewer:
    """State of one app: the store and the caches (open slides, drawn layers)."""

    def __init__(self, store: Store, values_ttl: float = VALUES_TTL):
        self.store = store
        self.slides: LRU[SlideTiles] = LRU(OPEN_SLIDES)
        self.layers: LRU[SpotLayers] = LRU(64, ttl=values_ttl)

    def slide(self, slide_id: str) -> dict:
        try:
            return queries.slide(self.store, slide_id)
        except queries.NotFound as exc:
            raise HTTPException(404, str(exc)) from exc

    def tiles(self, slide_id: str) -> SlideTiles:
        """The slide's open image (the store is read only when it is not open yet)."""

        def make() -> SlideTiles:
            row = self.slide(slide_id)
            try:
                return SlideTiles(row["image_path"])
            except InputError as exc:
                raise HTTPException(404, f"slide {slide_id!r}: {exc}") from exc

        return self.slides.get(slide_id, make)

    def read_layers(self, run_id: str, slide_id: str, gene: str) -> SpotLayers:
        """A run's values for one slide and gene (a label run: class) read from the store now
        (and cached)."""
        row = self.slide(slide_id)
        classes = None
        try:
            if label_queries.is_label_run(self.store, run_id):
                frame = label_queries.label_values(self.store, run_id, slide_id, gene)
                classes = queries.run_genes(self.store, run_id)
            else:
                frame = queries.values(self.store, run_id, slide_id, gene)
        except queries.NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        layers = SpotLayers.build(frame, row["um_per_px"], row["spot_diameter_um"], classes)
        self.layers.put((run_id, slide_id, gene), layers)
        return layers

    def spot_layers(self, run_id: str, slide_id: str, gene: str) -> SpotLayers:
        """The cached values (read again after ``values_ttl`` s, or by the values endpoint)."""
        return self.layers.get((run_id, slide_id, gene), lambda: self.read_layers(run_id, slide_id, gene))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _tile(tiles: SlideTiles, level: int, col: int, row: int) -> None:
    if not tiles.valid(level, col, row):
        raise HTTPException(404, f"no tile {level}/{col}_{row} (levels 0-{tiles.dz.level_count - 1})")


def create_app(store: Store | str | Path, values_ttl: float = VALUES_TTL) -> FastAPI:
    """The viewer app over ``store`` (a :class:`Store` or its path). ``values_ttl``: seconds a
    run's values read for drawing are reused (0: read the store on every request)."""
    viewer = Viewer(store if isinstance(store, Store) else Store(store), values_ttl)
    app = FastAPI(title="stimage-embed viewer", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.viewer = viewer
    app.mount("/static", StaticFiles(directory=static_dir()), name="static")

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        where = ".".join(str(x) for x in errs[0].get("loc", ())) if errs else "request"
        msg = errs[0].get("msg", "invalid") if errs else "invalid"
        return JSONResponse({"detail": _one_line(f"{where}: {msg}")}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
        return JSONResponse({"detail": _one_line(f"{type(exc).__name__}: {exc}")[:300]}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    _api_routes(app, viewer)
    _tile_routes(app, viewer)
    return app


def _api_routes(app: FastAPI, viewer: Viewer) -> None:
    @app.get("/api/slides")
    def slides() -> list[dict]:
        """Every slide: id, dataset, patient, image size (px), µm/px, spot diameter (µm), has_counts."""
        return queries.slides(viewer.store)

    @app.get("/api/runs")
    def runs() -> list[dict]:
        """Runs with predictions (newest first), with the slides each predicted."""
        return queries.runs(viewer.store)

    @app.get("/api/runs/{run_id}/genes")
    def genes(run_id: str) -> dict:
        try:
            return {"run_id": run_id, "genes": queries.run_genes(viewer.store, run_id)}
        except queries.NotFound as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.get("/api/runs/{run_id}/slides/{slide_id}/values")
    def values(run_id: str, slide_id: str, gene: str = Query(min_length=1, max_length=200)) -> dict:
        """Per spot: id, centre (level-0 px), predicted and measured log1p(CP10k), epistemic
        variance, P(high), cluster; the layers present with their shared scales. A label run
        (``kind`` label; ``gene`` is a class): P(class), predicted and observed class."""
        row = viewer.slide(slide_id)
        sl = viewer.read_layers(run_id, slide_id, gene)
        spots = [{k: _finite(v) for k, v in r.items()} for r in sl.frame.to_dicts()]
        return {
            "run_id": run_id,
            "kind": "label" if "prob_class" in sl.frame.columns else "expression",
            "slide_id": slide_id,
            "gene": gene,
            "um_per_px": row["um_per_px"],
            "spot_diameter_um": row["spot_diameter_um"],
            "radius_px": sl.radius_px,
            "layers": [layer for layer in LAYERS if layer in sl.scales],
            "legend": sl.legend(),
            "spots": spots,
        }

    @app.get("/api/slides/{slide_id}/similar/{spot_id}")
    def similar_spots(
        slide_id: str,
        spot_id: str,
        k: int = Query(5, ge=1, le=50),
        backbone: str | None = Query(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$"),
    ) -> dict:
        """Top-k spots of other slides nearest this one's image vector (the search feature)."""
        viewer.slide(slide_id)
        try:
            return similar(viewer.store, slide_id, spot_id, k, backbone)
        except NoVector as exc:
            raise HTTPException(404, str(exc)) from exc


def _tile_routes(app: FastAPI, viewer: Viewer) -> None:
    @app.get("/api/slides/{slide_id}/tiles")
    def tile_source(slide_id: str) -> dict:
        """Deep-zoom geometry of the slide image (what OpenSeadragon needs)."""
        return {"slide_id": slide_id, **viewer.tiles(slide_id).info()}

    @app.get("/tiles/{slide_id}.dzi")
    def dzi(slide_id: str) -> Response:
        return Response(viewer.tiles(slide_id).dz.get_dzi("jpeg"), media_type="application/xml")

    @app.get("/tiles/{slide_id}_files/{level}/{col}_{row}.jpeg")
    def tile(slide_id: str, level: int, col: int, row: int) -> Response:
        tiles = viewer.tiles(slide_id)
        _tile(tiles, level, col, row)
        return Response(tiles.tile_jpeg(level, col, row), media_type="image/jpeg", headers=TILE_HEADERS)

    @app.get("/overlay/{run_id}/{slide_id}/{layer}/{level}/{col}_{row}.png")
    def overlay(
        run_id: str, slide_id: str, layer: str, level: int, col: int, row: int, gene: str = Query(min_length=1)
    ) -> Response:
        if layer not in LAYERS:
            raise HTTPException(400, f"layer: expected one of {', '.join(LAYERS)}, got {layer!r}")
        tiles = viewer.tiles(slide_id)
        _tile(tiles, level, col, row)
        sl = viewer.spot_layers(run_id, slide_id, gene)
        img = sl.render(layer, tiles.tile_box(level, col, row))
        return Response(png_bytes(img), media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/slides/{slide_id}/spots/{spot_id}")
    def spot(slide_id: str, spot_id: str) -> dict:
        """One spot's centre (level-0 px) and radius (level-0 px), e.g. to jump to it."""
        row = viewer.slide(slide_id)
        x, y = spot_xy(viewer, slide_id, spot_id)
        radius = row["spot_diameter_um"] / 2 / row["um_per_px"]
        return {"slide_id": slide_id, "spot_id": spot_id, "pixel_x": x, "pixel_y": y, "radius_px": radius}

    @app.get("/thumb/{slide_id}/{spot_id}.jpeg")
    def thumb(slide_id: str, spot_id: str) -> Response:
        """A small image of one spot (1.5 spot diameters wide)."""
        row = viewer.slide(slide_id)
        x, y = spot_xy(viewer, slide_id, spot_id)
        size = 1.5 * row["spot_diameter_um"] / row["um_per_px"]
        arr = viewer.tiles(slide_id).window(x, y, size, THUMB_PX)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg", headers=TILE_HEADERS)


def spot_xy(viewer: Viewer, slide_id: str, spot_id: str) -> tuple[float, float]:
    """A spot's centre (level-0 px) from the store; 404 if the slide lacks it."""
    df = queries.run_query(
        viewer.store,
        ["spots"],
        "SELECT pixel_x, pixel_y FROM spots WHERE slide_id = ? AND spot_id = ?",
        [slide_id, spot_id],
    )
    if df.height == 0:
        raise HTTPException(404, f"unknown spot {spot_id!r} of slide {slide_id!r}")
    return float(df["pixel_x"][0]), float(df["pixel_y"][0])
