"""The documented Python API (issue 25, items 4-5): ``stimage_embed.__all__`` resolves, the
heads are importable as ``stimage_embed.heads``, the notebooks import only the public API,
and an installed (non-checkout) package finds the catalogs it carries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stimage_embed
from stimage_embed import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [n for n in stimage_embed.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert getattr(stimage_embed, name) is not None
    assert name in dir(stimage_embed)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stimage_embed.nope  # noqa: B018


def test_heads_are_importable_as_stimage_embed_heads():
    import heads
    import stimage_embed.heads as se_heads

    assert se_heads.NBRegressor is heads.NBRegressor and se_heads.load_head is heads.load_head
    assert set(heads.__all__) <= set(dir(se_heads))


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.py")), ids=lambda p: p.name)
def test_notebooks_import_only_the_public_api(notebook):
    tree = ast.parse(notebook.read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stimage_embed"):
            if node.module == "stimage_embed":
                private += [a.name for a in node.names if a.name not in stimage_embed.__all__]
            elif not node.module.startswith("stimage_embed.heads"):
                private.append(node.module)
        if isinstance(node, ast.Import):
            private += [a.name for a in node.names if a.name.startswith("stimage_embed.")]
    assert not private, private


def test_an_installed_package_reads_the_catalogs_it_carries(tmp_path, monkeypatch):
    """In a wheel install there is no checkout: the catalogs come from
    ``stimage_embed/catalogs`` (copied there by setup.py's build hook)."""
    monkeypatch.delenv(paths.CATALOGS_ENV, raising=False)
    assert paths.catalogs_dir() == paths.PROJECT_ROOT / "catalogs"  # a checkout: the source of truth
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path / "site-packages")
    assert paths.catalogs_dir() == Path(paths.__file__).resolve().parent / "catalogs"
