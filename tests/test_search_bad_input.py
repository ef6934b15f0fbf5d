"""Every bad input of ``search`` / ``index`` gets one error line (exit code 2) naming the
option, and the store is unchanged (every table at the same version)."""

from __future__ import annotations

import shutil

import pytest
from store_cases import one_error_line
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.store import Store
from stimage_embed.store import schema as S


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedded_store):
    """A copy of the embedded store with an empty vector table of a second backbone."""
    st = Store(tmp_path_factory.mktemp("bad") / "store")
    shutil.copytree(embedded_store.path, st.path)
    st.ensure_table("embeddings_efficientnet_lite1", S.embedding_schema(1280, optional=True))
    return st


def _versions(st: Store) -> dict[str, int]:
    return {n: st.table(n).version for n in st.table_names()}


def _one_line(res, *needles: str) -> str:
    return one_error_line(res.output, res.exit_code, *needles)


CASES = [
    (["search", "--like", "ZZ:1x1"], ["--like", "unknown slide 'ZZ'"]),
    (["search", "--like", "C4:nope"], ["--like", "no spot 'nope'"]),
    (["search", "--like", "C4"], ["--like", "SLIDE:SPOT"]),
    (["search"], ["--like/--image"]),
    (["search", "--like", "C4:x", "--backbone", "efficientnet_lite1"], ["--backbone", "no vectors"]),
    (["search", "--like", "C4:x", "--backbone", "resnet_nope"], ["--backbone", "no vectors"]),
    (["index", "--backbone", "efficientnet_lite1"], ["--backbone", "no vectors"]),
    (["search", "--like", "C4:{spot}", "--k", "0"], ["--k", "positive"]),
    (["search", "--like", "C4:{spot}", "--k", "-3"], ["--k", "positive"]),
    (["search", "--like", "C4:{spot}", "--where", "patient <>"], ["--where", "does not parse"]),
    (["search", "--like", "C4:{spot}", "--where", "no_such_column > 1"], ["--where", "no_such_column"]),
    (["search", "--like", "C4:{spot}", "--where", "1=1; DROP TABLE spots"], ["--where", "';'"]),
    (["search", "--like", "C4:{spot}", "--where", "slide_id IN (SELECT slide_id FROM slides)"], ["subquery"]),
    (["search", "--like", "C4:{spot}", "--where", "read_text('/etc/passwd') <> ''"], ["read_text"]),
    (["search", "--like", "C4:{spot}", "--where", "1=1) UNION SELECT * FROM t WHERE (1=1"], ["single predicate"]),
    (["search", "--like", "C4:{spot}", "--genes", "NOT_A_GENE"], ["--genes", "NOT_A_GENE"]),
    (["search", "--image", "{image}", "--um-per-px", "0.5", "--k", "0"], ["--k", "positive"]),
    (["search", "--image", "{image}", "--um-per-px", "0.5", "--where", "nope = 1"], ["--where", "nope"]),
    (["index", "--partitions", "0"], ["--partitions"]),
    (["index", "--index-type", "BTREE"], ["--index-type"]),
]


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_one_line_store_unchanged(store, args, needles):
    spot = store.read("embeddings_efficientnet_lite0", ["spot_id"], where="slide_id = 'C4'")["spot_id"][0].as_py()
    before = _versions(store)
    image = store.read("slides", ["image_path"], where="slide_id = 'C5'")["image_path"][0].as_py()
    args = [a.replace("{spot}", spot).replace("{image}", image) for a in args]
    res = CliRunner().invoke(app, args + ["--store", str(store.path)])
    _one_line(res, *needles)
    assert _versions(store) == before


def test_image_with_wrong_provenance_is_refused(store, tmp_path):
    """Weights other than the table's (sha256 differs): the region cannot carry its provenance."""
    slide = store.read("slides", ["image_path", "um_per_px"], where="slide_id = 'C5'").to_pylist()[0]
    fake = tmp_path / "other_weights.pth"
    fake.write_bytes(b"not the weights the vectors were embedded with")
    before = _versions(store)
    base = ["search", "--store", str(store.path), "--image", slide["image_path"]]
    res = CliRunner().invoke(app, [*base, "--um-per-px", str(slide["um_per_px"]), "--weights", str(fake)])
    _one_line(res, "sha256")
    res = CliRunner().invoke(app, [*base, "--um-per-px", str(slide["um_per_px"]), "--x", "-5", "--y", "10"])
    _one_line(res, "--x/--y", "outside")
    res = CliRunner().invoke(app, [*base])
    _one_line(res, "--um-per-px")
    assert _versions(store) == before
