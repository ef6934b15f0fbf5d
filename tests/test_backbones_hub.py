"""The real hub loading path, offline, against tiny models placed in a temporary HF cache.

A repo is laid out exactly as huggingface_hub stores it (``hub/models--<org>--<name>/`` with
``refs/main``, ``blobs/<sha256>`` and ``snapshots/<rev>/<file>`` symlinks), ``HF_HUB_CACHE``
points at it and ``HF_HUB_OFFLINE=1``. Models are then loaded through the same
``create_model(<name>, overrides=...)`` path as the full-size UNI / Virchow2 / Phikon, with
architecture overrides that shrink them, and compared with independently built references.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stimage_embed.backbones import create_model, get_spec, weights_available
from stimage_embed.errors import WeightsUnavailableError

REV = "0123456789abcdef0123456789abcdef01234567"
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline mode on."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> dict[str, Path]:
    """Store files as huggingface_hub does: content-addressed blobs, snapshot symlinks, refs/main."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    (repo / "blobs").mkdir(exist_ok=True)
    out = {}
    for fname, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / REV / fname
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
        out[fname] = link
    return out


def _randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter ~ N(0, 0.3) so no block is a near-identity (LayerScale init is 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _safetensors_bytes(sd: dict[str, torch.Tensor], tmp: Path) -> bytes:
    f = tmp / "tmp.safetensors"
    save_file(sd, str(f))
    return f.read_bytes()


def _torch_bytes(obj: object, tmp: Path) -> bytes:
    f = tmp / "tmp.bin"
    torch.save(obj, f)
    return f.read_bytes()


def _tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


# --- Virchow2 (timm hub format, registers, CLS ⊕ mean patch) -------------------------------------


def test_virchow2_loads_offline_from_hf_cache_and_pools_cls_mean_patch(hf_cache: Path, tmp_path: Path) -> None:
    # the model card's construction, written out here independently of catalogs/backbones.yaml
    direct = timm.create_model(
        "vit_huge_patch14_224",
        img_size=28,
        init_values=1e-5,
        num_classes=0,
        reg_tokens=4,
        mlp_ratio=5.3375,
        global_pool="",
        dynamic_img_size=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        **TINY_VIT,
    ).eval()
    sd = _randomise(direct, seed=1)
    config = {
        "architecture": "vit_huge_patch14_224",
        "num_classes": 0,
        "num_features": 32,
        "global_pool": "",
        "model_args": {
            "img_size": 28,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        "pretrained_cfg": {
            "tag": "tiny-test",
            "input_size": [3, 28, 28],
            "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "crop_pct": 1.0,
            "num_classes": 0,
        },
    }
    files = put_in_cache(
        hf_cache,
        "paige-ai/Virchow2",
        {"config.json": json.dumps(config).encode(), "model.safetensors": _safetensors_bytes(sd, tmp_path)},
    )
    assert weights_available("virchow2")
    assert not weights_available("virchow")  # other repo, not cached

    bb = create_model("virchow2", overrides={"img_size": 28, "input_size": 28, **TINY_VIT})
    assert bb.weights_source == "cache"
    assert bb.weights_path == str(files["model.safetensors"])
    assert bb.weights_sha256 == hashlib.sha256(files["model.safetensors"].read_bytes()).hexdigest()
    assert bb.embed_dim == 64 and bb.spec.embed_dim == 64
    assert bb.spec.spec_hash() != get_spec("virchow2").spec_hash()  # overrides are part of the provenance

    x = bb.preprocess(_tiles(3, 28))
    with torch.inference_mode():
        got = bb(x)
        tokens = direct(x)  # global_pool="" -> all tokens after the final norm
    assert tokens.shape == (3, 1 + 4 + 4, 32)  # CLS, 4 registers, 2x2 patches
    by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
    # registers really are skipped: including them changes the answer
    with_regs = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
    assert not torch.allclose(got, with_regs, atol=1e-3)


def test_uni_loads_torch_bin_from_cache_and_pools_cls(hf_cache: Path, tmp_path: Path) -> None:
    direct = timm.create_model(
        "vit_large_patch16_224",
        img_size=32,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
        **TINY_VIT,
    ).eval()
    sd = _randomise(direct, seed=2)
    put_in_cache(hf_cache, "MahmoodLab/UNI", {"pytorch_model.bin": _torch_bytes(sd, tmp_path)})
    bb = create_model("uni", overrides={"img_size": 32, "input_size": 32, **TINY_VIT})
    x = bb.preprocess(_tiles(2, 32, seed=3))
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), direct.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)
    assert bb.embed_dim == 32


def test_gated_model_missing_offline_names_repo_and_access(hf_cache: Path) -> None:
    assert not weights_available("uni")
    assert weights_available("efficientnet_lite0")  # shipped by a package, no hub needed
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("uni")
    msg = str(err.value)
    for needle in (
        "MahmoodLab/UNI",
        "https://huggingface.co/MahmoodLab/UNI",
        "HF_TOKEN",
        "hf auth login",
        "--weights PATH",
        "HF_HUB_OFFLINE",
    ):
        assert needle in msg, (needle, msg)
    with pytest.raises(WeightsUnavailableError, match="paige-ai/Virchow2"):
        create_model("virchow2")


def test_explicit_weights_path_wins_and_must_exist(hf_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("uni", weights=tmp_path / "nope.bin")
    direct = timm.create_model(
        "vit_large_patch16_224", img_size=32, patch_size=16, init_values=1e-5, num_classes=0, **TINY_VIT
    )
    sd = _randomise(direct, seed=4)
    path = tmp_path / "uni_local.safetensors"
    save_file(sd, str(path))
    bb = create_model("uni", weights=path, overrides={"img_size": 32, "input_size": 32, **TINY_VIT})
    assert bb.weights_source == "explicit" and bb.weights_path == str(path)
    # a checkpoint of the wrong architecture fails strictly, naming the file
    with pytest.raises(WeightsUnavailableError, match="uni_local.safetensors"):
        create_model(
            "uni",
            weights=path,
            overrides={"img_size": 32, "input_size": 32, "embed_dim": 32, "depth": 3, "num_heads": 2},
        )


# --- transformers-format checkpoints (Phikon / Phikon-v2) vs an independent reference ----------


def _hf_vit_state(
    depth: int, dim: int, mlp: int, patch: int, grid: int, dinov2: bool, seed: int
) -> dict[str, torch.Tensor]:
    """A random checkpoint with transformers' ViTModel / Dinov2Model key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    sd = {
        "embeddings.cls_token": r(1, 1, dim),
        "embeddings.position_embeddings": r(1, grid * grid + 1, dim),
        "embeddings.patch_embeddings.projection.weight": r(dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": r(dim),
        "layernorm.weight": 1 + r(dim),
        "layernorm.bias": r(dim),
    }
    if dinov2:
        sd["embeddings.mask_token"] = r(1, dim)
    else:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = r(dim, dim), r(dim)
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[p + f"attention.attention.{n}.weight"], sd[p + f"attention.attention.{n}.bias"] = r(dim, dim), r(dim)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r(dim, dim), r(dim)
        if dinov2:
            names = {"n1": "norm1", "n2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
            sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = r(dim), r(dim)
        else:
            names = {
                "n1": "layernorm_before",
                "n2": "layernorm_after",
                "fc1": "intermediate.dense",
                "fc2": "output.dense",
            }
        sd[p + names["n1"] + ".weight"], sd[p + names["n1"] + ".bias"] = 1 + r(dim), r(dim)
        sd[p + names["n2"] + ".weight"], sd[p + names["n2"] + ".bias"] = 1 + r(dim), r(dim)
        sd[p + names["fc1"] + ".weight"], sd[p + names["fc1"] + ".bias"] = r(mlp, dim), r(mlp)
        sd[p + names["fc2"] + ".weight"], sd[p + names["fc2"] + ".bias"] = r(dim, mlp), r(dim)
    return sd


def _hf_reference_cls(
    sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float, dinov2: bool
) -> torch.Tensor:
    """last_hidden_state[:, 0] of transformers' ViT / DINOv2, written from their module structure."""
    w = sd["embeddings.patch_embeddings.projection.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    h = F.conv2d(x, w, sd["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = (
        torch.cat([sd["embeddings.cls_token"].expand(x.shape[0], -1, -1), h], dim=1)
        + sd["embeddings.position_embeddings"]
    )
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    n1, n2, fc1, fc2 = (
        ("norm1", "norm2", "mlp.fc1", "mlp.fc2")
        if dinov2
        else ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense")
    )
    for i in range(depth):
        p = f"encoder.layer.{i}."
        y = F.layer_norm(h, (dim,), sd[p + n1 + ".weight"], sd[p + n1 + ".bias"], eps)
        q, k, v = (
            F.linear(y, sd[p + f"attention.attention.{n}.weight"], sd[p + f"attention.attention.{n}.bias"])
            for n in ("query", "key", "value")
        )
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ split(v)
        att = F.linear(
            att.transpose(1, 2).reshape(h.shape),
            sd[p + "attention.output.dense.weight"],
            sd[p + "attention.output.dense.bias"],
        )
        h = h + (att * sd[p + "layer_scale1.lambda1"] if dinov2 else att)
        y = F.layer_norm(h, (dim,), sd[p + n2 + ".weight"], sd[p + n2 + ".bias"], eps)
        y = F.linear(
            F.gelu(F.linear(y, sd[p + fc1 + ".weight"], sd[p + fc1 + ".bias"])),
            sd[p + fc2 + ".weight"],
            sd[p + fc2 + ".bias"],
        )
        h = h + (y * sd[p + "layer_scale2.lambda1"] if dinov2 else y)
    return F.layer_norm(h, (dim,), sd["layernorm.weight"], sd["layernorm.bias"], eps)[:, 0]


@pytest.mark.parametrize(
    ("name", "repo", "dinov2", "eps"),
    [("phikon", "owkin/phikon", False, 1e-12), ("phikon_v2", "owkin/phikon-v2", True, 1e-6)],
)
def test_transformers_checkpoint_matches_reference(
    hf_cache: Path, tmp_path: Path, name: str, repo: str, dinov2: bool, eps: float
) -> None:
    sd = _hf_vit_state(depth=2, dim=32, mlp=128, patch=16, grid=2, dinov2=dinov2, seed=5)
    put_in_cache(hf_cache, repo, {"model.safetensors": _safetensors_bytes(sd, tmp_path)})
    bb = create_model(name, overrides={"img_size": 32, "input_size": 32, **TINY_VIT})
    x = bb.preprocess(_tiles(2, 32, seed=6))
    with torch.inference_mode():
        torch.testing.assert_close(
            bb(x), _hf_reference_cls(sd, x, heads=2, eps=eps, dinov2=dinov2), rtol=1e-4, atol=1e-4
        )


# --- ResNet-50 cuts (local weights) --------------------------------------------------------------


def test_resnet50_layer3_and_global_pool_match_hand_computation(hf_cache: Path, tmp_path: Path) -> None:
    short = {"layers": [1, 1, 1, 1]}  # fewer blocks per stage, same channel widths
    ref = timm.create_model("resnet50", num_classes=0, **short).eval()
    sd = _randomise(ref, seed=7)
    with torch.no_grad():  # BN stats of a plausible scale
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.mul_(0.3)
    sd = ref.state_dict()
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    trunc = create_model("resnet50_trunc", weights=path, overrides=short)
    full = create_model("resnet50", weights=path, overrides=short)
    assert (trunc.embed_dim, full.embed_dim) == (1024, 2048)
    assert sum(p.numel() for p in trunc.model.layer4.parameters()) == 0  # layer4 pruned, never computed
    x = trunc.preprocess(_tiles(2, 64, seed=8))
    with torch.inference_mode():
        h = ref.maxpool(ref.act1(ref.bn1(ref.conv1(x))))
        h3 = ref.layer3(ref.layer2(ref.layer1(h)))
        torch.testing.assert_close(trunc(x), h3.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(full(x), ref.layer4(h3).mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


# --- CTransPath: a timm-0.5.4-era checkpoint (downsample at the end of a stage) -------------------


def test_ctranspath_reads_legacy_swin_checkpoint(hf_cache: Path, tmp_path: Path) -> None:
    from stimage_embed.backbones.builders import ConvStem

    small = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}
    ref = timm.create_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, num_classes=0, **small).eval()
    new = _randomise(ref, seed=9)
    legacy = {}
    for k, v in new.items():  # timm>=0.9 puts PatchMerging at the start of stage i+1; 0.5.4 at the end of stage i
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        legacy[k] = v
    legacy["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # persistent buffers of the old code
    legacy["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": legacy}, path)

    bb = create_model("ctranspath", weights=path, overrides=small)
    assert bb.embed_dim == 256
    x = bb.preprocess(_tiles(2, 224, seed=10))
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), ref(x), rtol=1e-4, atol=1e-4)


def test_conch_without_package_fails_clearly(hf_cache: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("conch") is not None:
        pytest.skip("the conch package is installed here")
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("conch")
    assert "conch" in str(err.value) and "pip install git+https://github.com/Mahmoodlab/CONCH.git" in str(err.value)
    assert not weights_available("conch")
