"""The LanceDB store: typed tables declared once (``schema``), atomic per-slide writes
(``store``), and DuckDB SQL over every table (``sql``)."""

from stimage_embed.store.store import Store

__all__ = ["Store"]
