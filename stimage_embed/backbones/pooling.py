"""Pooling strategies: how a backbone's features become one vector per tile.

Each strategy is three small functions: ``prepare(model)`` runs once after the weights are
loaded (e.g. drop layers the pooling never uses), ``pool(model, x)`` maps a batch ``x``
(N, 3, H, W) to ``(N, D)`` and ``dim(model)`` is ``D``, read from the model's attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _identity_prepare(model: nn.Module) -> nn.Module:
    return model


def pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own pooled features: timm ``forward_head(pre_logits=True)`` (classifier skipped),
    or ``model(x)`` for modules without a timm head (e.g. the CONCH adapter)."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


def cls_token(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token of a ViT after its final norm (token 0 of ``forward_features``)."""
    return model.forward_features(x)[:, 0]


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS + register tokens that precede the patch tokens (timm's ``num_prefix_tokens``)."""
    n = getattr(model, "num_prefix_tokens", None)
    if not isinstance(n, int):
        raise TypeError(f"{type(model).__name__} has no integer num_prefix_tokens; cls_mean_patch needs a timm ViT")
    return n


def cls_mean_patch(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Virchow's embedding: CLS token ⊕ mean of the patch tokens (register tokens skipped)."""
    tokens = model.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens(model) :].mean(dim=1)], dim=-1)


#: timm ResNet feature index of layer3 (0 = stem act, 1..4 = layer1..layer4).
_LAYER3 = 3


def _prune_after_layer3(model: nn.Module) -> nn.Module:
    model.prune_intermediate_layers(indices=[_LAYER3], prune_head=True)
    return model


def layer3_avg(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ResNet truncated after layer3 (stride 16), global average pool over H, W."""
    feats = model.forward_intermediates(x, indices=[_LAYER3], intermediates_only=True)[-1]
    return feats.mean(dim=(2, 3))


def feature_dim(model: nn.Module) -> int:
    """The model's feature width: timm's ``num_features``, else an integer ``embed_dim``."""
    if hasattr(model, "num_features"):
        return int(model.num_features)
    dim = getattr(model, "embed_dim", None)
    if not isinstance(dim, int):
        raise TypeError(f"cannot tell the output size of {type(model).__name__}")
    return dim


def _pooled_dim(model: nn.Module) -> int:
    """timm's pre-logits width ``head_hidden_size`` when the model has one, else :func:`feature_dim`."""
    return int(model.head_hidden_size) if hasattr(model, "head_hidden_size") else feature_dim(model)


@dataclass(frozen=True)
class PoolingStrategy:
    """One pooling: ``prepare(model)``, ``pool(model, x) -> (N, D)`` and ``dim(model) -> D``."""

    name: str
    prepare: Callable[[nn.Module], nn.Module]
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    dim: Callable[[nn.Module], int]


STRATEGIES: dict[str, PoolingStrategy] = {
    "pooled": PoolingStrategy("pooled", _identity_prepare, pooled, _pooled_dim),
    "cls": PoolingStrategy("cls", _identity_prepare, cls_token, feature_dim),
    "cls_mean_patch": PoolingStrategy(
        "cls_mean_patch", _identity_prepare, cls_mean_patch, lambda model: 2 * int(model.num_features)
    ),
    "layer3_avg": PoolingStrategy(
        "layer3_avg", _prune_after_layer3, layer3_avg, lambda model: int(model.feature_info[_LAYER3]["num_chs"])
    ),
}


def get_strategy(name: str) -> PoolingStrategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown pooling {name!r}; known: {sorted(STRATEGIES)}") from None
