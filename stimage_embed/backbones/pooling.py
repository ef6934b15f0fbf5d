"""Pooling strategies: how a backbone's features become one vector per tile.

Each strategy is a pair of small functions: ``prepare(model)`` runs once after the weights
are loaded (e.g. drop layers the pooling never uses) and ``pool(model, x)`` maps a batch
``x`` (N, 3, H, W) to ``(N, D)``. ``pooled_dim(name, model)`` is ``D``.
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


@dataclass(frozen=True)
class PoolingStrategy:
    name: str
    prepare: Callable[[nn.Module], nn.Module]
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor]


STRATEGIES: dict[str, PoolingStrategy] = {
    "pooled": PoolingStrategy("pooled", _identity_prepare, pooled),
    "cls": PoolingStrategy("cls", _identity_prepare, cls_token),
    "cls_mean_patch": PoolingStrategy("cls_mean_patch", _identity_prepare, cls_mean_patch),
    "layer3_avg": PoolingStrategy("layer3_avg", _prune_after_layer3, layer3_avg),
}


def get_strategy(name: str) -> PoolingStrategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown pooling {name!r}; known: {sorted(STRATEGIES)}") from None


def pooled_dim(name: str, model: nn.Module) -> int:
    """Length of the pooled vector for ``model`` under strategy ``name`` (from model attributes)."""
    if name == "cls_mean_patch":
        return 2 * int(model.num_features)
    if name == "layer3_avg":
        return int(model.feature_info[_LAYER3]["num_chs"])
    if name == "pooled" and hasattr(model, "head_hidden_size"):
        return int(model.head_hidden_size)
    if hasattr(model, "num_features"):
        return int(model.num_features)
    dim = getattr(model, "embed_dim", None)
    if not isinstance(dim, int):
        raise TypeError(f"cannot tell the output size of {type(model).__name__}")
    return dim
