"""The fast paths of the embedding pass give today's results: the look-up-table Macenko
transform equals the reference formula, stored (ingest-time) stain estimates equal a fit in
the pass, the background-thread stream equals the worker-process stream, and the pass's
vectors equal those of the path that fits every slide itself. Plus the byte count after
``--overwrite`` and the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.embeddings.stream_threads import compute_stream, prefetch
from stimage_embed.embeddings.tile_stream import (
    SlideJob,
    SlideStainFit,
    TileStream,
    make_chunks,
    stored_stain_estimates,
    template_normalizer,
)
from stimage_embed.predictions.arrays import load_embeddings
from stimage_embed.store import Store
from stimage_embed.store.maintenance import live_bytes
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.stain import MacenkoNormalizer, make_normalizer, od_lut, rgb_to_od, tissue_od_pixels
from stimage_embed.tiles.tissue import tissue_mask


def reference_transform(norm: MacenkoNormalizer, tile: np.ndarray) -> np.ndarray:
    """The Macenko transform as written before the look-up tables (the maths of record)."""
    od = od_lut(norm.Io)[tile.reshape(-1, 3)]
    conc = od @ np.linalg.pinv(norm.source_stain_matrix_)
    conc *= norm.target_max_concentrations_ / norm.source_max_concentrations_
    out = float(norm.Io) * np.exp(-(conc @ norm.target_stain_matrix_))
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(tile.shape)


@pytest.fixture(scope="module")
def slides(ingested_store: Store) -> pl.DataFrame:
    return pl.from_arrow(ingested_store.read("slides")).sort("slide_id")


@pytest.fixture(scope="module")
def thumbs(slides: pl.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for sid in ("C5", "MOB1"):
        with SlideImage.open(slides.filter(pl.col("slide_id") == sid)["image_path"][0]) as img:
            th, _ = img.thumbnail(2048)
        out[sid] = (th, tissue_mask(th))
    return out


def test_lookup_table_transform_equals_the_reference_formula(slides, thumbs) -> None:
    th, m = thumbs["C5"]
    target = make_normalizer("macenko", th, mask=m)
    rng = np.random.default_rng(0)
    with SlideImage.open(slides.filter(pl.col("slide_id") == "C5")["image_path"][0]) as img:
        tiles = np.stack([img.read_window(2000 + 97 * i, 3000 + 61 * i, 145.5, 224)[0] for i in range(16)])
    noise = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)  # ~2.4 M random colours
    th1, m1 = thumbs["MOB1"]
    for src in (target.fit_source(th1, mask=m1), target.own_source()):
        for x in (tiles, noise):
            ref = np.stack([reference_transform(src, t) for t in x])
            assert np.array_equal(src.transform(x), ref)
            assert np.array_equal(src.transformer()(x[3]), ref[3])


def test_tissue_od_pixels_equal_the_dense_formula(thumbs) -> None:
    th, m = thumbs["MOB1"]
    od = rgb_to_od(th.reshape(-1, 3))
    keep = np.all(od >= 0.15, axis=1) & m.ravel()
    assert np.array_equal(tissue_od_pixels(th, 240, 0.15, m), od[keep])


def test_stored_stain_estimates_equal_a_fit_in_the_pass(slides, thumbs) -> None:
    est = stored_stain_estimates(slides)
    assert set(est) == set(slides["slide_id"])  # every real section has enough tissue
    for sid, (th, m) in thumbs.items():
        sm, mc = MacenkoNormalizer().estimate(th, m)
        assert np.array_equal(est[sid]["stain_matrix"], sm) and np.array_equal(est[sid]["max_concentrations"], mc)
    # the template from its estimate == fitted on its thumbnail; its own source == fit_source
    th, m = thumbs["C5"]
    fitted = make_normalizer("macenko", th, mask=m)
    stored = template_normalizer("macenko", "/nonexistent.jpg", est["C5"])  # never opens the image
    assert fitted.to_dict() == stored.to_dict()
    assert fitted.own_source().to_dict() == fitted.fit_source(th, mask=m).to_dict()
    # a slide's source from its estimate == fitted on its thumbnail
    th1, m1 = thumbs["MOB1"]
    assert stored.with_source_estimate(est["MOB1"]).to_dict() == stored.fit_source(th1, mask=m1).to_dict()
    # estimates of another method or other parameters are not used
    assert MacenkoNormalizer(alpha=2.0).with_target_estimate(est["C5"]) is None
    assert make_normalizer("reinhard", th, mask=m).with_source_estimate(est["C5"]) is None


def _stream(
    slides: pl.DataFrame, store: Store, ids: list[str], per_slide: int, fit: SlideStainFit
) -> tuple[TileStream, list]:
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y"]))
    jobs, chunks = {}, []
    for r in slides.filter(pl.col("slide_id").is_in(ids)).iter_rows(named=True):
        sp = spots.filter(pl.col("slide_id") == r["slide_id"]).head(per_slide)
        jobs[r["slide_id"]] = SlideJob(r["slide_id"], r["image_path"], r["um_per_px"], r["spot_diameter_um"])
        chunks += make_chunks(
            r["slide_id"], sp["spot_id"].to_numpy(), sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy(), 8
        )
    return TileStream(chunks, jobs, (224,), stain_factory=fit), chunks


def test_thread_stream_equals_worker_stream_and_a_fit_in_the_pass(ingested_store, slides) -> None:
    """Three ways to the same tiles: background thread + stored estimates (the default on few
    cores), a DataLoader worker process, and fitting every slide on its thumbnail."""
    from torch.utils.data import DataLoader

    est = stored_stain_estimates(slides)
    target = template_normalizer("macenko", "", est["B4"])
    ids = ["B4", "C5", "MOB1"]  # B4 is the template
    fast, chunks = _stream(slides, ingested_store, ids, 12, SlideStainFit(target, "B4", est))
    refit, _ = _stream(slides, ingested_store, ids, 12, SlideStainFit(target))
    a = list(prefetch(fast.batches(chunks), depth=2))
    b = list(DataLoader(fast, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    c = list(refit.batches(chunks))
    assert [x["spot_ids"] for x in a] == [x["spot_ids"] for x in b] == [x["spot_ids"] for x in c] and len(a) == 6
    for x, y, z in zip(a, b, c):
        assert torch.equal(x["tiles"][224], y["tiles"][224]) and torch.equal(x["tiles"][224], z["tiles"][224])
        assert torch.equal(x["padded"], z["padded"])


def test_compute_threads_give_every_batch_of_the_stream_and_reraise_errors(ingested_store, slides) -> None:
    """The CPU layout (one compute thread per core, slides shared): every chunk once, the same
    tiles as the plain stream, and a compute error reaches the consumer; torch's thread count
    is restored."""
    est = stored_stain_estimates(slides)
    stream, chunks = _stream(
        slides,
        ingested_store,
        ["C5", "MOB1"],
        12,
        SlideStainFit(template_normalizer("macenko", "", est["B4"]), "B4", est),
    )
    ref = {(b["slide_id"], b["chunk"]): b for b in stream.batches(chunks)}
    before = torch.get_num_threads()
    got = list(compute_stream(stream, chunks, lambda b: b | {"sum": int(b["tiles"][224].sum())}, threads=2))
    assert sorted((b["slide_id"], b["chunk"]) for b in got) == sorted(ref) and len(got) == 4
    for b in got:
        r = ref[(b["slide_id"], b["chunk"])]
        assert (
            b["spot_ids"] == r["spot_ids"]
            and torch.equal(b["tiles"][224], r["tiles"][224])
            and b["sum"] == int(r["tiles"][224].sum())
        )

    def broken(batch):
        raise ValueError("model failed")

    with pytest.raises(ValueError, match="model failed"):
        list(compute_stream(stream, chunks, broken, threads=2))
    assert torch.get_num_threads() == before


def test_lead_slide_openings_only_reorders_and_opens_each_thread_a_slide_at_the_start() -> None:
    from stimage_embed.embeddings.stream_threads import lead_slide_openings
    from stimage_embed.embeddings.tile_stream import Chunk

    chunks = [Chunk(s, i, (), (), ()) for s, n in (("A", 5), ("B", 3), ("C", 4)) for i in range(n)]
    for lead in (1, 2, 3):
        got = lead_slide_openings(chunks, lead)
        assert sorted(got, key=chunks.index) == chunks  # a permutation
        for s in "ABC":  # each slide's chunks keep their order
            assert [c.index for c in got if c.slide_id == s] == sorted(c.index for c in got if c.slide_id == s)
        assert [c.slide_id for c in got[:lead]] == list("ABC"[:lead])  # one slide per thread at the start
    assert [(c.slide_id, c.index) for c in lead_slide_openings(chunks, 2)][:7] == [
        ("A", 0),
        ("B", 0),
        ("A", 1),
        ("A", 2),
        ("A", 3),
        ("A", 4),
        ("C", 0),
    ]


def test_prefetch_reraises_producer_errors_and_stops_early() -> None:
    def failing():
        yield {"tiles": {}, "padded": torch.zeros(1)}
        raise ValueError("broken slide")

    it = prefetch(failing(), depth=1)
    next(it)
    with pytest.raises(ValueError, match="broken slide"):
        next(it)

    closed = []

    def endless():
        try:
            i = 0
            while True:
                i += 1
                yield {"i": i}
        finally:
            closed.append(True)

    gen = prefetch(endless(), depth=2)
    assert [next(gen)["i"] for _ in range(3)] == [1, 2, 3]
    gen.close()  # the consumer stops: the producer is told, and its generator is closed
    assert closed == [True]


def test_pass_vectors_equal_the_refit_path_and_bytes_are_counted_after_overwrite(
    tmp_path, ingested_store, embedded_store
) -> None:
    """A store without stored estimates (older stores) fits each slide in the pass: the same
    vectors bit for bit as the session's store (estimates, one worker process). Then
    ``overwrite`` replaces the table and reports the bytes it wrote."""
    store = Store(tmp_path / "s")
    shutil.copytree(ingested_store.path, store.path)
    with store.writer("test"):
        store.db.open_table("slides").update(values_sql={"stain_estimate": "NULL"})
    assert not stored_stain_estimates(pl.from_arrow(store.read("slides")))
    rep = embed(store, ["efficientnet_lite0"], slides=["C5"], precision="float32", num_workers=0, progress=False)
    k1, x1 = load_embeddings(store, "efficientnet_lite0", ["C5"])
    k0, x0 = load_embeddings(embedded_store, "efficientnet_lite0", ["C5"])
    assert k1.equals(k0) and np.array_equal(x1, x0)
    table_bytes = live_bytes(store, "embeddings_efficientnet_lite0")
    assert rep.bytes_written >= 181 * 1280 * 2 and abs(rep.bytes_written - table_bytes) < 0.1 * table_bytes

    rep2 = embed(
        store, ["efficientnet_lite0"], slides=["C5"], precision="float32", num_workers=0, progress=False, overwrite=True
    )
    assert rep2.vectors == {"efficientnet_lite0": 181}
    assert rep2.bytes_written >= 181 * 1280 * 2, rep2.line()  # was ~0.01 MB: the net growth of the store directory
    k2, x2 = load_embeddings(store, "efficientnet_lite0", ["C5"])
    assert k2.equals(k0) and np.array_equal(x2, x0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pass_pins_memory_and_matches_cpu(tmp_path, monkeypatch, ingested_store, embedded_store) -> None:
    """On a GPU the pass runs the model there (autocast per the spec's dtype, pinned tiles,
    non-blocking copies); its vectors agree with the CPU pass to cosine >= 0.99 per vector
    (fp16/bf16 on the GPU against fp32 on the CPU)."""
    store = Store(tmp_path / "s")
    shutil.copytree(ingested_store.path, store.path)
    seen = []
    orig = torch.Tensor.pin_memory

    def spy(self, *a, **k):
        seen.append(True)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    rep = embed(store, ["efficientnet_lite0"], slides=["C5"], device="cuda", num_workers=0, progress=False)
    monkeypatch.undo()
    assert seen, "tiles were not pinned for the GPU copy"
    k1, x1 = load_embeddings(store, "efficientnet_lite0", ["C5"])
    k0, x0 = load_embeddings(embedded_store, "efficientnet_lite0", ["C5"])
    assert k1.equals(k0) and rep.precision["efficientnet_lite0"] in ("float16", "bfloat16", "float32")
    cos = (x1 * x0).sum(1) / np.linalg.norm(x1, axis=1) / np.linalg.norm(x0, axis=1)
    assert cos.min() >= 0.99, cos.min()
    prov = json.loads(store.sql("SELECT json FROM provenance")["json"][0])
    assert prov["precision"] == rep.precision["efficientnet_lite0"]
