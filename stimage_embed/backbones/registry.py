"""One registry, one ``create_model(name)`` (the timm way): names come from ``catalogs/backbones.yaml``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from stimage_embed.backbones.backbone import Backbone
from stimage_embed.backbones.builders import build
from stimage_embed.backbones.pooling import get_strategy
from stimage_embed.backbones.spec import BackboneSpec, load_backbone_catalog
from stimage_embed.backbones.weights import code_available, file_sha256, spec_weights_available
from stimage_embed.errors import CatalogError

log = logging.getLogger(__name__)

#: Override keys that change the spec itself; every other override key goes to ``timm_kwargs``.
SPEC_OVERRIDE_KEYS = frozenset({"input_size", "mean", "std", "interpolation", "pooling", "dtype", "builder_kwargs"})


def list_backbones(catalog: str | Path | None = None) -> list[str]:
    """Names of all backbones in the catalog, in file order."""
    return list(load_backbone_catalog(catalog))


def get_spec(name: str, catalog: str | Path | None = None) -> BackboneSpec:
    """The spec of ``name``; unknown names raise ``CatalogError`` listing the known ones."""
    specs = load_backbone_catalog(catalog)
    if name not in specs:
        source = next(iter(specs.values())).source
        raise CatalogError(source, "name", f"unknown backbone {name!r}; known backbones: {', '.join(specs)}")
    return specs[name]


def apply_overrides(spec: BackboneSpec, overrides: dict[str, Any] | None) -> BackboneSpec:
    """A copy of ``spec`` with overrides applied (re-validated).

    Keys in ``SPEC_OVERRIDE_KEYS`` replace spec fields; all other keys are merged into
    ``timm_kwargs`` (e.g. ``{"embed_dim": 32, "depth": 2}`` shrinks a ViT for tests).
    """
    if not overrides:
        return spec
    data = spec.model_dump()
    timm_kwargs = dict(data["timm_kwargs"])
    for key, value in overrides.items():
        if key in SPEC_OVERRIDE_KEYS:
            data[key] = value
        else:
            timm_kwargs[key] = value
    data["timm_kwargs"] = timm_kwargs
    try:
        return BackboneSpec.model_validate(data)
    except ValueError as exc:
        raise CatalogError(spec.source, f"{spec.name}.overrides", str(exc)) from exc


def weights_available(name: str, check_hub: bool = False, catalog: str | Path | None = None) -> bool:
    """True when ``create_model(name)`` can load without asking anyone for weights or code.

    Looks at the weights package and the local Hugging Face cache; never touches the network
    unless ``check_hub=True`` and ``HF_HUB_OFFLINE`` is unset.
    """
    spec = get_spec(name, catalog)
    return code_available(spec) and spec_weights_available(spec, check_hub=check_hub)


def create_model(
    name: str | BackboneSpec,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
    catalog: str | Path | None = None,
) -> Backbone:
    """Build a backbone by name: weights resolved (``weights`` path > package > HF cache > hub),
    loaded strictly, model in eval mode, channels-last, on ``device``.

    ``overrides`` (see ``apply_overrides``) are folded into the returned ``backbone.spec`` so
    ``spec_hash`` records them; ``embed_dim`` is then taken from the built model. Without
    overrides a model whose pooled size differs from the spec's ``embed_dim`` is an error.
    """
    base = name if isinstance(name, BackboneSpec) else get_spec(name, catalog)
    spec = apply_overrides(base, overrides)
    built = build(spec, weights)
    strategy = get_strategy(spec.pooling)
    model = strategy.prepare(built.model)
    dim = strategy.dim(model)
    if dim != spec.embed_dim:
        if overrides:
            spec = spec.model_copy(update={"embed_dim": dim})
        else:
            raise CatalogError(
                spec.source, f"{spec.name}.embed_dim", f"spec says {spec.embed_dim} but the built model pools to {dim}"
            )
    sha = file_sha256(built.weights.path)
    log.info("backbone %s: weights %s (%s, sha256 %s)", spec.name, built.weights.path, built.weights.source, sha[:12])
    bb = Backbone(spec, model, sha, str(built.weights.path), built.weights.source)
    bb.model.to(memory_format=torch.channels_last)
    return bb.to(torch.device(device)).eval()
