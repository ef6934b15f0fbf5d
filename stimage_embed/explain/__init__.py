"""Explanations of predictions at the level of nuclei, and clusters of predicted expression.

* :mod:`~stimage_embed.explain.segment`: nuclei segmentation in µm (haematoxylin threshold +
  distance-transform watershed by default; a registry of pluggable segmenters).
* :mod:`~stimage_embed.explain.morphology`: per-nucleus measurements (regionprops, µm).
* :mod:`~stimage_embed.explain.model_fn`: a saved model as a function of an RGB tile.
* :mod:`~stimage_embed.explain.lime_tile`: LIME over nuclei + background regions of a tile.
* :mod:`~stimage_embed.explain.run`: the ``explain`` verb (tiles, LIME, overlays, ``nuclei`` table).
* :mod:`~stimage_embed.evaluation.clusters`: Leiden clusters of predicted profiles (``cluster`` verb, ``infer``).
"""
