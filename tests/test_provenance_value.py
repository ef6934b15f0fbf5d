"""The one vector-provenance value (``VectorProvenance``) and the one vector-source parser
(``VectorSource``): ids against a hash computed here with hashlib, the differences that make
vectors not interchangeable, the saved-head form, legacy records, names round trip."""

from __future__ import annotations

import hashlib
import json

import pytest

from stimage_embed.embeddings.provenance import IDENTITY_FIELDS, NOT_RECORDED, VectorProvenance
from stimage_embed.embeddings.vector_source import VectorSource, VectorTable, vector_table_name
from stimage_embed.errors import InputError

RECORD = {
    "backbone": "efficientnet_lite0",
    "spec_hash": "ab" * 8,
    "weights_sha256": "cd" * 32,
    "transform": {"mean": [0.5, 0.5, 0.5], "std": (0.5, 0.5, 0.5), "size": 224},
    "tile_um": "spot_diameter",
    "tile_px": 224,
    "stain_method": "macenko",
    "stain_template": "C4",
    "stain": {"method": "macenko", "target": {"stain_matrix": [[0.6, 0.7, 0.3]]}, "target_hash": "ef" * 32},
    "stain_target": "ef" * 32,
    "precision": "float16",
    "package_version": "9.9",
}


def _reference_id(rec: dict, with_target: bool = True) -> str:
    ident = {k: rec.get(k) for k in IDENTITY_FIELDS}
    if with_target:
        ident["stain_target"] = rec["stain"]["target_hash"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_id_is_the_hash_of_the_identity_and_ignores_other_fields():
    prov = VectorProvenance.of(RECORD)
    assert prov.id == _reference_id(RECORD)
    assert VectorProvenance.of({**RECORD, "package_version": "0.1", "precision_probe": {"x": 1}}).id == prov.id
    legacy = {k: v for k, v in RECORD.items() if k != "stain_target"}  # written before the target was in the id
    assert VectorProvenance.of(legacy).id == _reference_id(RECORD, with_target=False)
    assert VectorProvenance.of(legacy) == prov  # ... yet the same vectors
    assert prov.setup_id == _reference_id(RECORD, with_target=False)


@pytest.mark.parametrize("field", [*IDENTITY_FIELDS, "stain_target"])
def test_every_identity_field_makes_a_difference(field):
    other = {**RECORD, field: "something else"}
    diff = VectorProvenance.of(RECORD).differences(VectorProvenance.of(other))
    assert list(diff) == [field] and diff[field][1] == "something else"
    assert VectorProvenance.of(other).id != VectorProvenance.of(RECORD).id


def test_saved_form_round_trips_and_an_old_head_without_a_target_still_matches():
    prov = VectorProvenance.of(RECORD)
    saved = prov.saved()
    assert all(isinstance(v, str) for v in saved.values()) and json.loads(saved["tile_px"]) == 224
    back = VectorProvenance.from_saved(json.loads(json.dumps(saved)))
    assert back == prov and not back.differences(prov)
    old = VectorProvenance.from_saved({k: v for k, v in saved.items() if k != "stain_target"})
    assert old.stain_target == NOT_RECORDED and not old.differences(prov)
    bare = VectorProvenance.from_saved({"backbone": saved["backbone"]})  # fields it lacks all differ
    assert set(bare.differences(prov)) == set(IDENTITY_FIELDS) - {"backbone"}


def test_composite_records_and_table_names():
    ctx = {**RECORD, "tile_um": 300.0, "context_um": 300.0, "stain_target": "12" * 32}
    merged = {k: [RECORD.get(k), ctx.get(k)] for k in dict.fromkeys([*RECORD, *ctx])}
    prov = VectorProvenance.of(merged)
    assert prov.source.name == "efficientnet_lite0+efficientnet_lite0__ctx300um"
    assert prov.stain_target == ["ef" * 32, "12" * 32]
    assert VectorProvenance.of(ctx).table_name == "embeddings_efficientnet_lite0__ctx300um"
    assert VectorProvenance.of(RECORD).table_name == "embeddings_efficientnet_lite0"


@pytest.mark.parametrize(
    "name,parts",
    [
        ("efficientnet_lite0", [("efficientnet_lite0", None)]),
        ("uni__ctx62p5um", [("uni", 62.5)]),
        ("a + b__ctx300um", [("a", None), ("b", 300.0)]),
        ("x__ctx062um", [("x__ctx062um", None)]),  # not a width the pass writes: a plain name
    ],
)
def test_vector_source_names_round_trip(name, parts):
    src = VectorSource.parse(name)
    assert [(p.backbone, p.context_um) for p in src.parts] == parts
    assert src.name == name.replace(" ", "") and VectorSource.parse(src.name) == src
    assert src.tables == ["embeddings_" + VectorTable(b, c).name for b, c in parts]
    if len(parts) == 1:
        assert vector_table_name(*parts[0]) == src.table


@pytest.mark.parametrize("name,needle", [("a+", "composite"), ("a+a", "distinct"), ("x'", "invalid backbone name")])
def test_bad_source_names_are_one_line_errors(name, needle):
    with pytest.raises(InputError, match=needle) as err:
        VectorSource.parse(name, "--backbone")
    assert "--backbone" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="composite"):
        _ = VectorSource.parse("a+b").table
