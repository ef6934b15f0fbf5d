"""Dataset catalogs: declarative YAML describing a cohort (see README, "Dataset catalogs").

A catalog names a reader, a root folder, the platform geometry and one entry per slide.
``load_catalog`` accepts a catalog name (``catalogs/datasets/<name>.yaml``) or a path to
any YAML file, validates it with pydantic and reports errors as ``<file>: <field>: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stimage_embed.errors import CatalogError
from stimage_embed.paths import SAFE_ID_RULE, catalogs_dir, data_root, safe_id


class SlideEntry(BaseModel):
    """One slide of a dataset. Paths are relative to the dataset root unless absolute."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    patient: str = Field(min_length=1)
    image: str
    counts: str | None = None
    spots: str | None = None
    #: Space Ranger ``spatial/scalefactors_json.json`` or HEST metadata JSON.
    metadata: str | None = None
    #: micrometres per full-resolution pixel, overrides metadata and estimation.
    um_per_px: float | None = Field(default=None, gt=0)
    #: Xenium: 10x's H&E alignment matrix CSV (3x3 affine, H&E px -> Xenium morphology px).
    alignment: str | None = None

    @field_validator("id", "patient", mode="before")
    @classmethod
    def _coerce_str(cls, v: Any) -> Any:
        # YAML reads ids like 1 or 2021 as ints; ids are labels, keep them as strings.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class DatasetCatalog(BaseModel):
    """A cohort: reader, root, platform geometry, biology and slides."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    reader: str
    root: str = "."
    platform: Literal["legacy_st", "visium", "visium_hd", "xenium", "other"]
    spot_diameter_um: float = Field(gt=0)
    spot_pitch_um: float = Field(gt=0)
    #: µm between consecutive array coordinate values; defaults to ``spot_pitch_um``.
    #: Staggered arrays that index every other position (e.g. STUtility's x+y-even
    #: layout) step half a pitch per unit.
    array_step_um: float | None = Field(default=None, gt=0)
    species: str
    tissue: str
    preservation: Literal["frozen", "ffpe", "unknown"] = "unknown"
    um_per_px: float | None = Field(default=None, gt=0)
    reader_options: dict[str, Any] = Field(default_factory=dict)
    slides: list[SlideEntry] = Field(min_length=1)
    #: tile width (µm) cut around each spot by the embedding pass; default ``spot_diameter_um``.
    #: Visium HD bins / Xenium cells are far smaller than a backbone's input (HEST: 112 µm).
    tile_um: float | None = Field(default=None, gt=0)
    #: Visium HD: bin size (µm) the 2 µm bins are summed to; a multiple of 2 (8, 16, 32 ...).
    bin_um: float | None = Field(default=None, gt=0)
    #: Xenium: group cells onto a Visium-like hex lattice (``spot_pitch_um`` apart) of spots of
    #: this diameter (µm), counts summed; ``None`` keeps one spot per cell.
    pseudo_spots_um: float | None = Field(default=None, gt=0)

    #: set by ``load_catalog``: the YAML file and the resolved dataset root.
    source: Path | None = Field(default=None, exclude=True)
    root_path: Path | None = Field(default=None, exclude=True)

    @field_validator("bin_um")
    @classmethod
    def _bin_multiple_of_2(cls, v: float | None) -> float | None:
        if v is not None and abs(v / 2.0 - round(v / 2.0)) > 1e-9:
            raise ValueError(f"bin_um must be a multiple of the 2 µm Visium HD bin (8, 16, 32 ...), got {v:g}")
        return v

    def resolve(self, relative: str | None) -> Path | None:
        """Absolute path of a file named in the catalog (relative to the dataset root)."""
        if relative is None:
            return None
        p = Path(relative).expanduser()
        if p.is_absolute():
            return p
        assert self.root_path is not None, "catalog not loaded through load_catalog"
        return self.root_path / p

    def slide(self, slide_id: str) -> SlideEntry:
        for s in self.slides:
            if s.id == slide_id:
                return s
        raise CatalogError(self.source, "slides", f"no slide with id {slide_id!r}")


def available_catalogs() -> list[str]:
    d = catalogs_dir() / "datasets"
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _format_loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts and parts[-1] == "slides":
            try:
                parts[-1] = f"slides[{item}] (id={raw['slides'][item].get('id')!r})"
                continue
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts)


def load_catalog(name_or_path: str | Path, data_root_override: str | Path | None = None) -> DatasetCatalog:
    """Load and validate a dataset catalog by name or by path.

    Relative ``root`` values resolve against the data root (``--data-root`` /
    ``$STIMAGE_DATA_ROOT`` / ``../shared/data``); a root starting with ``./`` or ``../``
    in a user YAML resolves against the YAML's own folder.
    """
    candidate = Path(str(name_or_path)).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        path = candidate
        if not path.is_file():
            raise CatalogError(path, None, "catalog file does not exist")
    else:
        path = catalogs_dir() / "datasets" / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_catalogs()) or "none"
            raise CatalogError(
                None,
                None,
                f"unknown catalog {str(name_or_path)!r}; known catalogs: {known}; or pass a path to a YAML file",
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(path, None, f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CatalogError(path, None, "a catalog must be a YAML mapping")
    try:
        cat = DatasetCatalog.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _format_loc(err["loc"], raw)
        got = err.get("input")
        got_s = f" (got {got!r} of type {type(got).__name__})" if not isinstance(got, dict) else ""
        more = f"; and {len(exc.errors()) - 1} more error(s)" if len(exc.errors()) > 1 else ""
        raise CatalogError(path, field, f"{err['msg']}{got_s}{more}") from exc

    from stimage_embed.ingest.readers import READERS  # local import: readers import catalog

    if cat.reader not in READERS:
        raise CatalogError(
            path, "reader", f"unknown reader {cat.reader!r}; known readers: {', '.join(sorted(READERS))}"
        )
    ids = [s.id for s in cat.slides]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise CatalogError(path, "slides.id", f"duplicate slide ids {dups}")
    unsafe = [i for i in ids if not safe_id(i)]
    if unsafe:
        raise CatalogError(path, "slides.id", f"invalid slide id(s) {unsafe} ({SAFE_ID_RULE})")
    root = Path(cat.root).expanduser()
    if not root.is_absolute():
        if cat.root.startswith(("./", "../")) or cat.root == ".":
            root = path.resolve().parent / root
        else:
            root = data_root(data_root_override) / root
    cat.source = path.resolve()
    cat.root_path = root.resolve()
    return cat
