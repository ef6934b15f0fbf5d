"""Reader registry. A reader turns one catalog slide entry into a :class:`SlideData`.

Signature of every reader::

    read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData

Readers validate their own files (NaN / negative / non-integer counts, duplicate spot
ids, duplicate genes, missing columns) and raise :class:`~stimage_embed.errors.InputError`
naming the file and field. Spots without counts are reported in ``skipped_spots``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
    from stimage_embed.ingest.types import SlideData

#: reader name -> "module:function" (imported lazily, so one reader's optional
#: dependency never breaks the others).
READERS: dict[str, str] = {
    "legacy_st": "stimage_embed.ingest.readers.legacy_st:read_slide",
    "visium": "stimage_embed.ingest.readers.visium:read_slide",
    "hest": "stimage_embed.ingest.readers.hest:read_slide",
    "anndata": "stimage_embed.ingest.readers.anndata_reader:read_slide",
    "visium_hd": "stimage_embed.ingest.readers.visium_hd:read_slide",
    "xenium": "stimage_embed.ingest.readers.xenium:read_slide",
}


def get_reader(name: str) -> Callable[[DatasetCatalog, SlideEntry], SlideData]:
    from stimage_embed.errors import CatalogError

    if name not in READERS:
        raise CatalogError(None, "reader", f"unknown reader {name!r}; known readers: {', '.join(sorted(READERS))}")
    module, func = READERS[name].split(":")
    return getattr(importlib.import_module(module), func)
