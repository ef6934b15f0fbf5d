"""The layout rules of the developers' guide, checked on the source tree: one-way data flow
between the stages, ``heads`` free of ``stimage_embed``, small modules, functions and lines,
Lance internals only in ``stimage_embed/store``, and every registered head built from its
spec and following the one head contract (``heads`` package doc)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from stimage_embed.predictions.registry import HEADS, OUTPUT_KINDS, head_spec

ROOT = Path(__file__).resolve().parents[1]
#: stages in data-flow order; a module may import only from its own stage or earlier ones
#: (``store`` serves all; ``tiles`` holds the image primitives ingest's tissue QC uses)
STAGES = (
    "errors",
    "paths",
    "store",
    "tiles",
    "ingest",
    "backbones",
    "embeddings",
    "predictions",
    "evaluation",
    "inference",
    "cli_helpers",
    "cli",
)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    out += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "stimage_embed" and len(parts) > 1 and parts[1] in STAGES else None


def test_stages_import_only_earlier_stages():
    rank = {s: i for i, s in enumerate(STAGES)}
    wrong = []
    for path in _sources("stimage_embed"):
        rel = path.relative_to(ROOT / "stimage_embed").parts
        me = rel[0].removesuffix(".py")
        if me not in rank:
            continue
        for mod in _imports(path):
            other = _stage(mod)
            if other is not None and rank[other] > rank[me]:
                wrong.append(f"{path.relative_to(ROOT)} ({me}) imports {mod}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_heads_never_import_stimage_embed():
    wrong = [
        f"{p.relative_to(ROOT)}: {m}"
        for p in _sources("heads")
        for m in _imports(p)
        if m.split(".")[0] == "stimage_embed"
    ]
    assert not wrong, wrong


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LINE_CHARS = 400, 80, 120
#: files over a limit when the check was added (issue 19); each owner brings theirs under
#: the limits and deletes its entry. Any file not listed here must meet every limit.
STRAGGLERS = frozenset(
    {
        "stimage_embed/backbones/weights.py",
        "stimage_embed/cli.py",
        "stimage_embed/cli_helpers.py",
        "stimage_embed/embeddings/embed_pass.py",
        "stimage_embed/embeddings/ray_engine.py",
        "stimage_embed/evaluation/compare.py",
        "stimage_embed/evaluation/plots.py",
        "stimage_embed/inference/grid.py",
        "stimage_embed/ingest/pipeline.py",
        "stimage_embed/ingest/readers/_validate.py",
        "stimage_embed/ingest/readers/anndata_reader.py",
        "stimage_embed/ingest/readers/visium.py",
        "stimage_embed/predictions/genes.py",
        "stimage_embed/store/store.py",
    }
)


def _size_violations(path: Path) -> list[str]:
    """Every limit ``path`` breaks: module lines, function lines, characters per line."""
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    out = [f"{rel}: {len(lines)} lines"] if len(lines) > MAX_MODULE_LINES else []
    out += [f"{rel}:{i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return out


def test_modules_functions_and_lines_stay_small():
    """Library modules <= 400 lines, functions <= 80 lines, lines <= 120 characters."""
    wrong = [
        v
        for path in _sources("stimage_embed") + _sources("heads")
        if path.relative_to(ROOT).as_posix() not in STRAGGLERS
        for v in _size_violations(path)
    ]
    assert not wrong, "over the size limits:\n" + "\n".join(wrong)


def test_the_size_check_catches_each_limit(tmp_path):
    bad = tmp_path / "bad.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    bad.write_text(f"def f():\n{body}\n" + "y = 1\n" * MAX_MODULE_LINES + "z = '" + "a" * 130 + "'\n")
    found = _size_violations(bad)
    assert any("f: 81 lines" in v for v in found)
    assert any(v.endswith(f"{MAX_FUNCTION_LINES + 2 + MAX_MODULE_LINES} lines") for v in found)
    assert any("136 characters" in v for v in found)


#: the Lance packages whose objects only ``stimage_embed/store`` may hold (``lance_ray`` is
#: a writer the Ray engine hands fragments to, not the store's state)
LANCE_MODULES = ("lance", "lancedb")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _store_private_names() -> set[str]:
    """Private attributes (``self._x = ...``) and private methods (``def _x``) of the classes
    of ``stimage_embed/store``."""
    names = set()
    for path in (ROOT / "stimage_embed" / "store").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef) and _private(f.name)}
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and _private(node.attr)
                and isinstance(node.ctx, ast.Store)
            ):
                names.add(node.attr)
    return names


def lance_private_uses(path: Path, private: set[str]) -> list[str]:
    """Where ``path`` reaches Lance private state: an import of ``lance``/``lancedb`` (or a
    submodule), an import of a ``_name`` from ``stimage_embed.store``, or an attribute
    ``obj._name`` (``obj`` not ``self``/``cls``) that the store's classes keep private."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module]
            if node.module.startswith("stimage_embed.store"):
                out += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
        out += [f"{path.name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in LANCE_MODULES]
        if (
            isinstance(node, ast.Attribute)
            and node.attr in private
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            out.append(f"{path.name}:{node.lineno} reads .{node.attr}")
    return out


def test_nothing_outside_the_store_touches_lance_private_state():
    private = _store_private_names()
    assert "_committed" in private  # the rule knows the store's state
    store = ROOT / "stimage_embed" / "store"
    wrong = [
        f"{p.relative_to(ROOT)}: {u}"
        for p in _sources("stimage_embed") + _sources("heads")
        if store not in p.parents
        for u in lance_private_uses(p, private)
    ]
    assert not wrong, "Lance private state outside stimage_embed/store:\n" + "\n".join(wrong)


def test_the_lance_rule_catches_each_kind_of_reach(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import lance.dataset\nfrom lancedb import connect\nfrom stimage_embed.store.store import _helper\n"
        "def f(store):\n    return store._committed\n"
    )
    found = lance_private_uses(bad, {"_committed"})
    assert [u.split(" ", 1)[1] for u in found] == [
        "imports lance.dataset",
        "imports lancedb",
        "imports _helper",
        "reads ._committed",
    ]


@pytest.mark.parametrize("name", list(HEADS))
def test_every_registered_head_is_buildable_from_its_spec(name):
    spec = head_spec(name)
    assert spec.output in OUTPUT_KINDS
    if spec.output == "combined":
        assert spec.spans_backbones and spec.combines in HEADS and spec.build is None
        return
    head = spec.make()
    assert type(head).__name__ in spec.build or spec.build.endswith("seed_ensemble")
    params = head.get_params(deep=True)
    for key, value in spec.defaults.items():  # the spec's defaults reach the estimator (or its base)
        assert params.get(key, params.get(f"base_estimator__{key}")) == value, key
    assert clone(head).get_params(deep=False).keys() == head.get_params(deep=False).keys()  # sklearn contract
    if spec.takes_alpha_from:
        assert "alpha" in head.get_params(deep=True) or any(k.endswith("__alpha") for k in head.get_params(deep=True))


def test_unknown_head_names_the_registered_ones():
    with pytest.raises(ValueError, match="choose from " + ", ".join(HEADS)):
        head_spec("xgboost")


@pytest.mark.parametrize("name", [n for n in HEADS if HEADS[n].build is not None])
def test_every_registered_head_follows_the_contract(name):
    """Keyword-only extras on ``fit`` and on the one output method ``predict_outputs``, and
    scikit-learn's ``NotFittedError`` from an unfitted head."""
    head = head_spec(name).make()
    for method in ("fit", "predict_outputs"):
        sig = inspect.signature(getattr(head, method))
        for extra in ("groups", "library_size", "coords"):
            assert sig.parameters[extra].kind is inspect.Parameter.KEYWORD_ONLY, (method, extra)
    with pytest.raises(NotFittedError):
        head.predict_outputs(np.zeros((3, 8), np.float32))
