"""Inference on slides that have only an image (``stimage-embed infer``).

Data flow: ``model`` (load a saved model, check its vector provenance can be reproduced)
-> ``slide_from_image`` (open the image, µm/px, register it as a slide without counts)
-> ``grid`` (tissue on a thumbnail, a grid of tiles over it) -> the embedding pass
(``stimage_embed.embeddings.embed_pass``) -> ``predict_tiles`` (chunked predictions into
the ``predictions`` table) -> ``anndata_out``, ``heatmaps``, ``pseudobulk``; ``infer``
orchestrates.
"""
