"""Results stay right when the store changes (issue 18): options checked before any write,
``--overwrite`` replaces vectors in the commit of the first new ones, a failed re-ingest
leaves the previous slide whole, run ids cover the content of their inputs (vectors and
counts), one stain target per store, images changed on disk are noticed before cutting.

Data: two tiny slides cut from HER2ST C5 (S1) and C4 (S2), 12 real spots each
(tests/store_cases.py ``mini_dataset``).
"""

from __future__ import annotations

import errno
import gzip
import shutil

import imagecodecs
import numpy as np
import polars as pl
import pytest
from store_cases import BACKBONE, CHUNK, TABLE, copy_store, mini_dataset, table_rows

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.embeddings.provenance import existing_provenance, identity
from stimage_embed.embeddings.stain_target import record as record_stain_target
from stimage_embed.errors import InputError, ProvenanceError, StoreError
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.inference.infer import infer
from stimage_embed.ingest.pipeline import ingest
from stimage_embed.predictions.train_predict import train
from stimage_embed.store import Store

FAST = dict(stain="none", precision="float32", batch_size=CHUNK, num_workers=0, progress=False)
CORE = {
    "slides": ("slide_id",),
    "spots": ("slide_id", "spot_id"),
    "genes": ("slide_id", "gene_index"),
    "expression": ("slide_id", "spot_id"),
}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, real_data_root):
    """(store with S1, S2 ingested and embedded without stain normalisation, catalog)."""
    root = tmp_path_factory.mktemp("mini18")
    catalog = mini_dataset(root / "data", real_data_root)
    store = Store(root / "store")
    ingest(str(catalog), store, progress=False)
    embed(store, [BACKBONE], **FAST)
    return store, catalog


def _state(store: Store, tables=(TABLE,)) -> dict:
    """Each table's Lance version and rows (exact-state comparisons)."""
    keys = {**CORE, TABLE: ("slide_id", "spot_id")}
    return {t: (store.dataset(t).version, table_rows(store, t, keys[t])) for t in tables}


# --- item 5: options are checked before --overwrite deletes anything ---------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"batch_size": -5, "slides": ["S1"]},
        {"num_workers": -3, "slides": ["S1"]},
        {"flush_rows": 0},
        {"precision": "bogus"},
        {"device": "bogus"},
    ],
)
def test_bad_embed_options_are_refused_before_overwrite_deletes(tmp_path, mini, bad):
    """Before: `--overwrite --batch-size 0` dropped the table; `--slide C5 --batch-size -5`
    deleted C5's vectors and exited 0 ("all spots already embedded")."""
    st = copy_store(mini[0], tmp_path / "s")
    before = _state(st)
    with pytest.raises(InputError):
        embed(st, [BACKBONE], overwrite=True, **{**FAST, **bad})
    assert _state(st) == before


@pytest.mark.parametrize("slides", [None, ["S1"]])
def test_overwrite_that_fails_before_its_first_commit_keeps_the_old_vectors(tmp_path, mini, monkeypatch, slides):
    """The old vectors go in the same commit as the first new ones: a disk full at that
    commit leaves the table as it was."""
    st = copy_store(mini[0], tmp_path / "s")
    before = _state(st)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "replace_where", full)
    monkeypatch.setattr(st, "append", full)
    with pytest.raises(OSError):
        embed(st, [BACKBONE], overwrite=True, slides=slides, **FAST)
    assert _state(st)[TABLE][1] == before[TABLE][1]
    monkeypatch.undo()
    report = embed(st, [BACKBONE], overwrite=True, slides=slides, **FAST)
    n = sum(1 for r in before[TABLE][1] if slides is None or r["slide_id"] in slides)
    assert report.vectors == {BACKBONE: n}
    after = _state(st)[TABLE][1]
    assert [(r["slide_id"], r["spot_id"]) for r in after] == [(r["slide_id"], r["spot_id"]) for r in before[TABLE][1]]
    np.testing.assert_array_equal(
        np.stack([r["vector"] for r in after]), np.stack([r["vector"] for r in before[TABLE][1]])
    )


# --- item 6: a failed re-ingest leaves the previous version of the slide whole -------------------
@pytest.mark.parametrize("failing", ["expression", "slides"])
def test_reingest_failing_with_a_full_disk_keeps_the_previous_slide(tmp_path, mini, real_data_root, failing):
    """Before: the `slides` row was deleted first; ENOSPC during the re-ingest of C2 left C2
    absent from slides, spots and expression, and its vectors orphaned."""
    st = copy_store(mini[0], tmp_path / "s")
    names = (*CORE, TABLE)
    before = _state(st, names)
    moved = mini_dataset(tmp_path / "moved", real_data_root, slides={"S1": "C5"}, shift_px={"S1": 60.0})
    replace = st.replace_slides

    def disk_full(name, data, slide_ids, schema=None):
        if name == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(name, data, slide_ids, schema)

    st.replace_slides = disk_full
    with pytest.raises(OSError, match="No space"):
        ingest(str(moved), st, progress=False)
    st = Store(st.path)
    after = _state(st, names)
    assert {t: rows for t, (_, rows) in after.items()} == {t: rows for t, (_, rows) in before.items()}
    assert st.pending("ingest") == []
    # the next re-ingest goes through and invalidates S1's vectors (its spots moved)
    ingest(str(moved), st, progress=False)
    assert st.sql(f"SELECT COUNT(*) AS n FROM {TABLE} WHERE slide_id = 'S1'")["n"][0] == 0


# --- item 4: an image changed on disk without a re-ingest is noticed before cutting ----------------
def test_an_image_changed_on_disk_is_refused_until_reingested(tmp_path, mini):
    """Before: `embed --overwrite --slide C5` cut new vectors from the changed file, stamped
    them with the old geometry hash and used the old stain estimate and tissue QC."""
    st = copy_store(mini[0], tmp_path / "s")
    path = st.read("slides", ["image_path"], where="slide_id = 'S1'")["image_path"][0].as_py()
    image = tmp_path / "S1.jpg"
    shutil.copy(path, image)
    st.db.open_table("slides").update(where="slide_id = 'S1'", values={"image_path": str(image)})
    before = _state(st)
    embed(st, [BACKBONE], slides=["S1"], overwrite=True, **FAST)  # the unchanged file: accepted
    assert _state(st)[TABLE][1] == before[TABLE][1]
    pixels = imagecodecs.imread(str(image))
    image.write_bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(255 - pixels), level=90))  # same size, new content
    before = _state(st)
    with pytest.raises(InputError, match="changed on disk since it was ingested.*stimage-embed ingest mini --slide S1"):
        embed(st, [BACKBONE], slides=["S1"], overwrite=True, **FAST)
    assert _state(st) == before


# --- item 1: a run id covers the content of its inputs ---------------------------------------------
CMP = dict(backbones=[BACKBONE], heads=["mean", "nb"], genes="hvg:5")


def _changed_image(root, real_data_root, slide: str, section: str):
    """A catalog re-ingesting ``slide`` with its image's colours inverted (same size and spots)."""
    cat = mini_dataset(root, real_data_root, slides={slide: section})
    img = root / f"{slide}.jpg"
    img.write_bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(255 - imagecodecs.imread(str(img))), level=90))
    return cat


def _changed_counts(root, real_data_root, slide: str, section: str):
    """A catalog re-ingesting ``slide`` with one count of its first spot raised by 7."""
    cat = mini_dataset(root, real_data_root, slides={slide: section})
    path = root / f"{slide}.tsv.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    cells = lines[1].split("\t")
    cells[1] = str(int(float(cells[1])) + 7)
    lines[1] = "\t".join(cells)
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return cat


def _fresh_leaderboard(store: Store, tmp_path) -> pl.DataFrame:
    """The leaderboard recomputed from scratch on a copy of ``store`` (no runs kept)."""
    fresh = copy_store(store, tmp_path)
    for name in ("runs", "predictions", "metrics"):
        fresh.drop_table(name)
    return compare(fresh, CompareConfig(**CMP), progress=False).leaderboard


def _board(board: pl.DataFrame) -> pl.DataFrame:
    return board.select("head", "pcc_mean", "mse_mean").sort("head")


def _same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Equal leaderboards (heads, and scores up to the summation order of the aggregates)."""
    assert got["head"].to_list() == want["head"].to_list()
    for c in ("pcc_mean", "mse_mean"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-9, equal_nan=True)


def _nb_pcc(board: pl.DataFrame) -> float:
    return round(float(board.filter(pl.col("head") == "nb")["pcc_mean"][0]), 4)


def test_compare_recomputes_runs_whose_vectors_or_counts_changed(tmp_path, mini, real_data_root):
    """Before: after C4 was re-ingested with a changed image and re-embedded, compare reported
    "0 computed, 4 reused" with the old nb PCC (0.294 against a true 0.206)."""
    st = copy_store(mini[0], tmp_path / "s")
    first = compare(st, CompareConfig(**CMP), progress=False)
    assert first.computed == 4 and compare(st, CompareConfig(**CMP), progress=False).reused == 4
    # S2's image changes: re-ingest drops its vectors, embed cuts them again from the new image
    ingest(str(_changed_image(tmp_path / "img", real_data_root, "S2", "C4")), st, progress=False)
    embed(st, [BACKBONE], **FAST)
    second = compare(st, CompareConfig(**CMP), progress=False)
    assert (second.computed, second.reused) == (4, 0) and not set(second.run_ids) & set(first.run_ids)
    want = _board(_fresh_leaderboard(st, tmp_path / "fresh1"))
    _same(_board(second.leaderboard), want)
    assert not np.allclose(_board(first.leaderboard)["pcc_mean"], want["pcc_mean"], equal_nan=True)
    boards = {"before the change (was reused)": first.leaderboard, "recomputed": second.leaderboard}
    boards["fresh store"] = want
    pcc = {k: _nb_pcc(b) for k, b in boards.items()}
    print(f"\n[issue 18 item 1] nb PCC (mini slides, hvg:5): {pcc}")  # shown with -s
    # the old runs stay, marked superseded, and the SQL leaderboard shows only the current ones
    status = st.sql("SELECT run_id, superseded FROM runs_status")
    assert sorted(status.filter(pl.col("superseded"))["run_id"]) == sorted(first.run_ids)
    _same(_board(st.sql("SELECT * FROM leaderboard")), want)
    # S1's counts change (its image and vectors do not): every run using S1 is new
    ingest(str(_changed_counts(tmp_path / "counts", real_data_root, "S1", "C5")), st, progress=False)
    assert embed(st, [BACKBONE], **FAST).vectors == {}
    third = compare(st, CompareConfig(**CMP), progress=False)
    assert (third.computed, third.reused) == (4, 0)
    _same(_board(st.sql("SELECT * FROM leaderboard")), _board(_fresh_leaderboard(st, tmp_path / "fresh2")))


# --- items 2 and 3: one stain target per store ---------------------------------------------------------
STAIN = dict(FAST, stain="macenko")


def test_the_stain_target_is_recorded_once_and_does_not_move_when_slides_are_added(tmp_path, mini, real_data_root):
    """Before: each new table took the first slide id as its template, so adding slide A1, or
    `infer` registering an image-only slide, made `embed -b efficientnet_lite1` normalise against
    that slide while lite0 was against S1, and `embed -b lite0,lite1` was refused."""
    st = copy_store(mini[0], tmp_path / "s")
    # infer registers an image-only slide A0 (first in id order) before any target is recorded
    run_id, _ = train(st, BACKBONE, "ridge", "hvg:5", ["S1"])
    s2 = st.read("slides", ["image_path", "um_per_px"], where="slide_id = 'S2'").to_pylist()[0]
    xy = st.sql("SELECT pixel_x AS x, pixel_y AS y FROM spots WHERE slide_id = 'S2' ORDER BY spot_id LIMIT 2")
    box = (xy["x"].min() - 100, xy["y"].min() - 100, xy["x"].max() + 100, xy["y"].max() + 100)  # a few tiles (px)
    done = infer(st, s2["image_path"], run_id, tmp_path / "i", "A0", s2["um_per_px"], region=box, num_workers=0)
    assert 0 < done.n_pass_qc <= done.n_tiles < 20
    assert st.sql("SELECT platform FROM slides WHERE slide_id = 'A0'")["platform"].to_list() == ["image_only"]
    embed(st, [BACKBONE], overwrite=True, **STAIN)
    rec = st.read("stain_target").to_pylist()
    assert [(r["template_slide"], r["chosen_by"]) for r in rec] == [("S1", "rule")]  # image-only A0 never qualifies
    extra = mini_dataset(tmp_path / "extra", real_data_root, slides={"A1": "C3"}, name="extra")
    ingest(str(extra), st, progress=False)
    report = embed(st, [BACKBONE, "efficientnet_lite1"], **STAIN)  # `embed -b lite0,lite1` after adding A1
    n = dict(st.sql(f"SELECT slide_id, COUNT(*) AS n FROM {TABLE} GROUP BY 1").iter_rows())
    assert sorted(n) == ["A0", "A1", "S1", "S2"] and min(n.values()) > 0
    assert report.vectors == {BACKBONE: n["A1"], "efficientnet_lite1": sum(n.values())}
    tables = [TABLE, "embeddings_efficientnet_lite1"]
    templates = {t: {p["stain_template"] for p in existing_provenance(st, t)} for t in tables}
    targets = {t: {identity(p)["stain_target"] for p in existing_provenance(st, t)} for t in tables}
    assert templates == {t: {"S1"} for t in tables}
    assert len(targets[TABLE] | targets["embeddings_efficientnet_lite1"]) == 1
    assert st.read("stain_target").to_pylist() == rec  # recorded once: the same row
    # choosing another template while a table keeps the old target is refused in one line
    with pytest.raises(InputError, match="stain template is slide 'S1'.*--overwrite"):
        embed(st, ["efficientnet_lite1"], overwrite=True, stain_template="A1", **STAIN)
    with pytest.raises(InputError, match="'A0' has no counts"):
        embed(st, [BACKBONE], overwrite=True, stain_template="A0", **STAIN)


def test_a_run_combining_vectors_of_different_stain_targets_is_refused(tmp_path, mini):
    """Before: FSTimage averaged backbones normalised to different targets with no warning."""
    st = copy_store(mini[0], tmp_path / "s")  # lite0: no stain normalisation
    embed(st, ["efficientnet_lite1"], **STAIN)  # lite1: Macenko against S1
    pair = [BACKBONE, "efficientnet_lite1"]
    for cfg in (
        CompareConfig(backbones=pair, heads=["nb", "fstimage"], genes="hvg:5"),
        CompareConfig(backbones=["+".join(pair)], heads=["mean"], genes="hvg:5"),  # a composite a+b
    ):
        with pytest.raises(InputError, match="stain-normalised differently.*efficientnet_lite0: none.*macenko"):
            compare(st, cfg, progress=False)
    assert not st.has_table("runs")
    # the same method against two targets: lite0 against S1, the record moved to S2, lite1 against S2
    embed(st, [BACKBONE], overwrite=True, **STAIN)
    record_stain_target(st, "S2", "explicit")
    embed(st, ["efficientnet_lite1"], overwrite=True, **STAIN)
    tables = (TABLE, "embeddings_efficientnet_lite1")
    lite0, lite1 = ({identity(p)["stain_target"] for p in existing_provenance(st, t)} for t in tables)
    assert len(lite0) == len(lite1) == 1 and lite0 != lite1
    with pytest.raises((InputError, StoreError), match="stain"):
        compare(st, CompareConfig(backbones=pair, heads=["nb", "fstimage"], genes="hvg:5"), progress=False)
    assert not st.has_table("runs")


def test_reingesting_the_stain_template_makes_its_tables_stale(tmp_path, mini, real_data_root):
    """Before: re-ingesting the template C4 with a changed image re-embedded C4 against the new
    target while C5 kept vectors normalised to the old one, under one provenance id."""
    st = copy_store(mini[0], tmp_path / "s")
    embed(st, [BACKBONE], overwrite=True, **STAIN)
    compare(st, CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5"), progress=False)
    ingest(str(_changed_image(tmp_path / "img", real_data_root, "S1", "C5")), st, progress=False)  # the template
    with pytest.raises(ProvenanceError, match="stain target changed.*embed --overwrite --backbone"):
        embed(st, [BACKBONE], **STAIN)
    with pytest.raises(StoreError, match="older stain target.*embed --overwrite --backbone"):
        compare(st, CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5"), progress=False)
    embed(st, [BACKBONE], overwrite=True, **STAIN)
    [target] = {identity(p)["stain_target"] for p in existing_provenance(st, TABLE)}
    assert st.sql(f"SELECT COUNT(DISTINCT provenance_id) AS n FROM {TABLE}")["n"][0] == 1
    res = compare(st, CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5"), progress=False)
    assert res.computed == 2  # new runs, and the runs on the old target are superseded
    status = st.sql("SELECT run_id, superseded FROM runs_status")
    assert sorted(status.filter(~pl.col("superseded"))["run_id"]) == sorted(res.run_ids) and status.height == 4
