"""Backbones: a declarative registry (``catalogs/backbones.yaml``) and one ``create_model(name)``.

>>> from stimage_embed.backbones import create_model
>>> bb = create_model("efficientnet_lite0")            # embedded default, no network
>>> vectors = bb(bb.preprocess(tiles_uint8_nhwc))      # (N, 1280)

See ``spec`` (the typed spec), ``weights`` (local path > package > HF cache > hub),
``builders`` (four builders for all specs, each one registration whose needs are declared in
``builder_needs``), ``pooling`` (strategy table: prepare, pool, pooled size) and ``speed``
(autocast choice).
"""

from stimage_embed.backbones.backbone import Backbone
from stimage_embed.backbones.registry import apply_overrides, create_model, get_spec, list_backbones, weights_available
from stimage_embed.backbones.spec import BackboneSpec, load_backbone_catalog
from stimage_embed.backbones.speed import PrecisionDecision, autocast_dtype, choose_precision, to_channels_last

__all__ = [
    "Backbone",
    "BackboneSpec",
    "PrecisionDecision",
    "apply_overrides",
    "autocast_dtype",
    "choose_precision",
    "create_model",
    "get_spec",
    "list_backbones",
    "load_backbone_catalog",
    "to_channels_last",
    "weights_available",
]
