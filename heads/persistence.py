"""Save and load fitted heads without pickle: ``head.json`` + ``arrays.safetensors``.

``head.json`` holds the class name, ``get_params(deep=False)``, the learned non-array
attributes (scalars, lists, dicts), the names of the learned arrays, nested fitted
members (seed / backbone ensembles) and the provenance of the vectors the head was
trained on. ``arrays.safetensors`` holds every learned numeric array and torch state dict
(as numpy arrays, exact dtypes). Loading rebuilds the estimator from its parameters and
sets the attributes back, so ``load_head(save_head(h)).predict(X)`` equals
``h.predict(X)`` bit for bit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from heads.baselines import MeanBaseline, RidgeBaseline
from heads.classifier import HighLowClassifier
from heads.context import ContextNBRegressor
from heads.ensemble import SeedEnsemble
from heads.errors import ProvenanceMismatch
from heads.knn import KNNRegressor
from heads.label import LabelClassifier
from heads.nb import NBRegressor

logger = logging.getLogger(__name__)

FORMAT = "heads/1"
JSON_NAME = "head.json"
ARRAYS_NAME = "arrays.safetensors"
HEAD_CLASSES = MappingProxyType(
    {
        c.__name__: c
        for c in (NBRegressor, SeedEnsemble, HighLowClassifier, RidgeBaseline, MeanBaseline, ContextNBRegressor)
        + (KNNRegressor,)
        + (LabelClassifier, LogisticRegression, StandardScaler)  # the label head and its fitted parts
    }
)
_MISSING = "<missing>"


# --------------------------------------------------------------------------- JSON values


def _encode(value: Any, where: str) -> Any:
    """JSON-encodable form of a parameter or learned attribute (tagged for exact decoding)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return _encode(value.item(), where)
    if isinstance(value, np.ndarray):
        return {
            "__ndarray__": [_encode(v, where) for v in value.ravel().tolist()],
            "dtype": value.dtype.str,
            "shape": list(value.shape),
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: dict keys must be str, got {bad[0]!r}")
        return {"__dict__": {k: _encode(v, f"{where}.{k}") for k, v in value.items()}}
    if isinstance(value, BaseEstimator):
        name = type(value).__name__
        if name not in HEAD_CLASSES:
            raise TypeError(f"{where}: cannot save estimator of class {name}; supported: {sorted(HEAD_CLASSES)}")
        return {"__estimator__": name, "params": _encode(value.get_params(deep=False), where)}
    raise TypeError(f"{where}: cannot save a value of type {type(value).__name__} without pickle")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if "__estimator__" in value:
        return HEAD_CLASSES[value["__estimator__"]](**_decode(value["params"]))
    raise ValueError(f"{JSON_NAME}: unknown encoded value with keys {sorted(value)}")


# --------------------------------------------------------------------------- heads


def _is_estimator_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, BaseEstimator) for v in value)


def _is_estimator_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, BaseEstimator) for v in value.values())


def _export(head: BaseEstimator, prefix: str, arrays: dict[str, np.ndarray]) -> dict:
    name = type(head).__name__
    if name not in HEAD_CLASSES:
        raise TypeError(f"save_head: unsupported head class {name}; supported: {sorted(HEAD_CLASSES)}")
    check_is_fitted(head)
    meta: dict[str, Any] = {
        "class": name,
        "params": _encode(head.get_params(deep=False), f"{name}.params"),
        "attrs": {},
        "arrays": [],
        "modules": [],
        "members": {},
    }
    for attr, value in vars(head).items():
        if not attr.endswith("_") or attr.startswith("_") or attr == "provenance_":
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[prefix + attr] = np.ascontiguousarray(value)
            meta["arrays"].append(attr)
        elif isinstance(value, nn.Module):
            for key, tensor in value.state_dict().items():
                arrays[f"{prefix}{attr}.{key}"] = tensor.detach().cpu().numpy().copy()
            meta["modules"].append(attr)
        elif isinstance(value, BaseEstimator):
            meta["members"][attr] = {"kind": "one", "items": _export(value, f"{prefix}{attr}.", arrays)}
        elif _is_estimator_list(value):
            meta["members"][attr] = {
                "kind": "list",
                "items": [_export(m, f"{prefix}{attr}.{i}.", arrays) for i, m in enumerate(value)],
            }
        elif _is_estimator_dict(value):
            meta["members"][attr] = {
                "kind": "dict",
                "items": {k: _export(m, f"{prefix}{attr}.{k}.", arrays) for k, m in value.items()},
            }
        else:
            meta["attrs"][attr] = _encode(value, f"{name}.{attr}")
    return meta


def _import(meta: dict, prefix: str, arrays: dict[str, np.ndarray]) -> BaseEstimator:
    cls = HEAD_CLASSES.get(meta["class"])
    if cls is None:
        raise ValueError(f"{JSON_NAME}: class: unknown head class {meta['class']!r}")
    head = cls(**_decode(meta["params"]))
    for attr, value in meta["attrs"].items():
        setattr(head, attr, _decode(value))
    for attr in meta["arrays"]:
        key = prefix + attr
        if key not in arrays:
            raise ValueError(f"{ARRAYS_NAME}: array {key!r} listed in {JSON_NAME} is missing")
        setattr(head, attr, arrays[key])
    for attr, spec in meta["members"].items():
        if spec["kind"] == "one":
            setattr(head, attr, _import(spec["items"], f"{prefix}{attr}.", arrays))
        elif spec["kind"] == "list":
            setattr(head, attr, [_import(m, f"{prefix}{attr}.{i}.", arrays) for i, m in enumerate(spec["items"])])
        else:
            setattr(head, attr, {k: _import(m, f"{prefix}{attr}.{k}.", arrays) for k, m in spec["items"].items()})
    for attr in meta["modules"]:
        module = head.make_module()
        prefix_mod = f"{prefix}{attr}."
        state = {
            k[len(prefix_mod) :]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix_mod)
        }
        module.load_state_dict(state, strict=True)
        module.eval()
        setattr(head, attr, module)
    return head


def _normalise(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance as it reads back from JSON (tuples -> lists, numpy scalars -> Python)."""
    if not isinstance(provenance, Mapping):
        raise TypeError(f"provenance: expected a dict, got {type(provenance).__name__}")
    return json.loads(json.dumps(dict(provenance), default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _differences(have: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (have.get(k, _MISSING), v) for k, v in expected.items() if have.get(k, _MISSING) != v}


def save_head(head: BaseEstimator, directory: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``head.json`` and ``arrays.safetensors`` of a fitted head into ``directory``
    (created if needed) and return the directory.

    ``provenance`` describes the vectors the head was trained on (backbone id, weights
    sha256, transform, tile µm, stain method...). If the head already carries a
    ``provenance_`` (e.g. it was loaded) the two must agree (``ProvenanceMismatch``).
    """
    prov = _normalise(provenance)
    if getattr(head, "provenance_", None) is not None:
        diff = _differences(_normalise(head.provenance_), prov) | {
            k: (v, _MISSING) for k, v in _normalise(head.provenance_).items() if k not in prov
        }
        if diff:
            raise ProvenanceMismatch(diff)
    arrays: dict[str, np.ndarray] = {}
    meta = _export(head, "", arrays)
    doc = {
        "format": FORMAT,
        "provenance": prov,
        "versions": {"numpy": np.__version__, "torch": torch.__version__},
        "head": meta,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out / ARRAYS_NAME), metadata={"format": FORMAT})
    (out / JSON_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True))
    logger.debug("saved %s (%d arrays) to %s", meta["class"], len(arrays), out)
    return out


def load_head(directory: str | Path) -> BaseEstimator:
    """Rebuild a head written by :func:`save_head`; it carries ``provenance_``."""
    d = Path(directory)
    json_path, arrays_path = d / JSON_NAME, d / ARRAYS_NAME
    for p in (json_path, arrays_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (expected a directory written by heads.save_head)")
    doc = json.loads(json_path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{json_path}: format: expected {FORMAT!r}, got {doc.get('format')!r}")
    head = _import(doc["head"], "", load_file(str(arrays_path)))
    head.provenance_ = doc["provenance"]
    return head


def check_provenance(head: BaseEstimator, provenance: Mapping[str, Any]) -> None:
    """Raise :class:`heads.errors.ProvenanceMismatch` unless every key of ``provenance``
    has the same value in ``head.provenance_`` (a key absent from the head counts as a
    difference; extra keys on the head are ignored). The error names each differing key
    with both values. A generic comparison of the plain dicts it is handed: what makes two
    sets of vectors the same is decided by the caller (``stimage_embed``:
    ``embeddings.provenance.VectorProvenance``)."""
    have = getattr(head, "provenance_", None)
    expected = _normalise(provenance)
    if have is None:
        raise ProvenanceMismatch({k: (_MISSING, v) for k, v in expected.items()} or {"provenance": (_MISSING, "{}")})
    diff = _differences(_normalise(have), expected)
    if diff:
        raise ProvenanceMismatch(diff)
