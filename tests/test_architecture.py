"""The layout rules of the developers' guide, checked on the source tree: one-way data flow
between the stages, ``heads`` free of ``stimage_embed``, small modules and functions, and
every registered head buildable from its spec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def test_modules_and_functions_stay_small():
    big_modules, long_functions = [], []
    for path in _sources("stimage_embed") + _sources("heads"):
        src = path.read_text(encoding="utf-8")
        if len(src.splitlines()) > 400:
            big_modules.append(f"{path.relative_to(ROOT)}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                )
    assert not big_modules and not long_functions, big_modules + long_functions


@pytest.mark.parametrize("name", list(HEADS))
def test_every_registered_head_is_buildable_from_its_spec(name):
    spec = head_spec(name)
    assert spec.output in OUTPUT_KINDS
    if spec.output == "combined":
        assert spec.spans_backbones and spec.combines in HEADS and spec.build is None
        return
    head = spec.make()
    assert type(head).__name__ in spec.build or spec.build.endswith("seed_ensemble")
    assert head.get_params()  # a scikit-learn estimator
    if spec.takes_alpha_from:
        assert "alpha" in head.get_params(deep=True) or any(k.endswith("__alpha") for k in head.get_params(deep=True))


def test_unknown_head_names_the_registered_ones():
    with pytest.raises(ValueError, match="choose from " + ", ".join(HEADS)):
        head_spec("xgboost")
