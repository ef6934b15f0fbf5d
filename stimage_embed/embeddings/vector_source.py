"""Names of vector sources: the one parser and builder of what heads call a "backbone".

A vector source names one or more vector tables:

* ``<backbone>``: the spot tiles embedded by a registered backbone, table ``embeddings_<backbone>``;
* ``<backbone>__ctx<W>um``: the wider window of ``W`` µm centred on each spot
  (``embed --context-um W``), table ``embeddings_<backbone>__ctx<W>um``; ``W`` is written
  ``300`` for 300 µm and ``62p5`` for 62.5 µm;
* ``a+b``: a composite, the per-spot concatenation of the vectors of ``a`` and ``b``
  (``a``'s columns first), e.g. ``efficientnet_lite0+efficientnet_lite0__ctx300um``.

``VectorSource.parse(name)`` reads any of them (one-line :class:`InputError` naming the
option otherwise) and ``.name`` writes it back; ``.parts`` are its :class:`VectorTable` s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stimage_embed.errors import InputError
from stimage_embed.store import schema as S

#: joins the vector tables of a composite source: ``a+b``
COMPOSITE_SEPARATOR = "+"
#: table-name suffix of context windows: ``embeddings_<backbone>__ctx<width>um``
CONTEXT_SUFFIX = "__ctx{width}um"
_CONTEXT_NAME = re.compile(r"(?P<backbone>.+)__ctx(?P<width>[0-9]+(?:p[0-9]+)?)um")


def context_width_label(context_um: float) -> str:
    """``300`` for 300.0 µm, ``62p5`` for 62.5 µm: a width as table names allow it."""
    width = float(context_um)
    if not (0 < width < float("inf")):  # also refuses NaN
        raise InputError(None, "--context-um", f"a context width must be a positive number of µm, got {context_um!r}")
    return f"{width:g}".replace(".", "p")


@dataclass(frozen=True)
class VectorTable:
    """One vector table: ``backbone`` (a registered backbone name) and ``context_um`` (the
    window width in µm of a context table, None for spot tiles)."""

    backbone: str
    context_um: float | None = None

    @property
    def name(self) -> str:
        """The source name of this table: ``<backbone>`` or ``<backbone>__ctx<W>um``."""
        if self.context_um is None:
            return self.backbone
        return self.backbone + CONTEXT_SUFFIX.format(width=context_width_label(self.context_um))

    @property
    def table(self) -> str:
        """The store's table of these vectors: ``embeddings_<name>``."""
        return S.embedding_table_name(self.name)

    @classmethod
    def parse(cls, name: str, field: str = "--backbone") -> VectorTable:
        """The table named ``name`` (``<backbone>`` or ``<backbone>__ctx<W>um``)."""
        if not isinstance(name, str) or not S.BACKBONE_NAME.fullmatch(name):
            raise InputError(
                None,
                field,
                f"invalid backbone name {name!r}: letters, digits and '_' only (see `stimage-embed backbones`)",
            )
        m = _CONTEXT_NAME.fullmatch(name)
        if m is None:
            return cls(name)
        width = float(m["width"].replace("p", "."))
        if width <= 0 or context_width_label(width) != m["width"]:  # not a name the pass writes: a plain name
            return cls(name)
        return cls(m["backbone"], width)


@dataclass(frozen=True)
class VectorSource:
    """A vector source: one :class:`VectorTable` or the composite of several (see the module doc)."""

    parts: tuple[VectorTable, ...]

    @classmethod
    def parse(cls, name: str, field: str = "--backbone") -> VectorSource:
        """Parse a source name; one-line :class:`InputError` naming ``field`` if malformed."""
        names = [p.strip() for p in str(name).split(COMPOSITE_SEPARATOR)]
        if any(not p for p in names) or len(set(names)) != len(names):
            raise InputError(
                None,
                field,
                f"{name!r}: a composite names distinct vector tables joined by "
                f"{COMPOSITE_SEPARATOR!r}, e.g. efficientnet_lite0+efficientnet_lite0__ctx300um",
            )
        return cls(tuple(VectorTable.parse(p, field) for p in names))

    @classmethod
    def of(cls, backbone: str, context_um: float | None = None) -> VectorSource:
        """The single-table source of ``backbone`` (a context window of ``context_um`` µm)."""
        return cls((VectorTable(backbone, None if context_um is None else float(context_um)),))

    @property
    def name(self) -> str:
        return COMPOSITE_SEPARATOR.join(p.name for p in self.parts)

    @property
    def part_names(self) -> list[str]:
        """Each part's source name (a single source: ``[name]``)."""
        return [p.name for p in self.parts]

    @property
    def tables(self) -> list[str]:
        """Each part's table, in order."""
        return [p.table for p in self.parts]

    @property
    def is_composite(self) -> bool:
        return len(self.parts) > 1

    def _single(self) -> VectorTable:
        if self.is_composite:
            raise InputError(None, "--backbone", f"{self.name!r} is a composite of {len(self.parts)} vector tables")
        return self.parts[0]

    @property
    def backbone(self) -> str:
        """The registered backbone of a single source."""
        return self._single().backbone

    @property
    def context_um(self) -> float | None:
        """The window width (µm) of a single context source, None for spot tiles."""
        return self._single().context_um

    @property
    def table(self) -> str:
        """The table of a single source."""
        return self._single().table


def vector_table_name(backbone: str, context_um: float | None = None) -> str:
    """The table of a backbone's vectors: ``embeddings_<backbone>`` for spot tiles (each
    slide's spot diameter, or ``--tile-um``), ``embeddings_<backbone>__ctx<W>um`` for the
    wider window of ``context_um`` µm centred on each spot (one table per width, each
    with its own provenance recording ``tile_um = context_um``). Heads load a context
    table as the source ``<backbone>__ctx<W>um``."""
    return VectorSource.of(backbone, context_um).table
