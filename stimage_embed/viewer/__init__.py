"""``stimage-embed view``: a local web viewer of predictions over the slide.

An OpenSeadragon page (shipped in ``static/``, no network at run time) over a FastAPI app:
deep-zoom tiles of the slide image (:mod:`.deepzoom`), overlay tiles of a run's spots
(:mod:`.overlay`) and JSON endpoints reading the store with parameterised SQL (:mod:`.queries`).
See docs/viewer.md.
"""
