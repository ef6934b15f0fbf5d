"""Similar spots for the click panel, from the morphology search feature
(:func:`stimage_embed.search.search`: cosine distance between stored image vectors, exact
or through the table's vector index, prefiltered to other slides).

When the store holds no vectors the panel reports search as unavailable.

Backbone: the one asked for, else the default backbone when the store has its vectors,
else the first ``embeddings_*`` table (by name).
"""

from __future__ import annotations

from stimage_embed.errors import InputError
from stimage_embed.paths import DEFAULT_BACKBONE
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store


def default_backbone(store: Store) -> str | None:
    """The backbone whose vectors the panel searches (see the module doc), or None."""
    if store.has_table(S.embedding_table_name(DEFAULT_BACKBONE)):
        return DEFAULT_BACKBONE
    names = sorted(n for n in store.table_names() if n.startswith(S.EMBEDDING_PREFIX))
    return names[0].removeprefix(S.EMBEDDING_PREFIX) if names else None


class NoVector(LookupError):
    """The spot has no stored vector of the backbone (the app answers 404)."""


def similar(store: Store, slide_id: str, spot_id: str, k: int, backbone: str | None = None) -> dict:
    """``{"available": bool, "backbone": str | None, "spots": [{slide_id, spot_id, distance}]}``:
    the ``k`` spots of other slides nearest this spot's vector, nearest first (``distance`` =
    1 - cosine). :class:`NoVector` when the spot (or the asked backbone) has no vector."""
    from stimage_embed.search import search

    backbone = backbone or default_backbone(store)
    if backbone is None:
        return {"available": False, "backbone": backbone, "spots": []}
    try:
        hits = search(store, backbone, like=f"{slide_id}:{spot_id}", k=k, exclude_slide=True)
    except InputError as exc:
        raise NoVector(exc.reason) from exc
    spots = hits.select("slide_id", "spot_id", "distance").to_dicts()
    return {"available": True, "backbone": backbone, "spots": spots}
