"""The typed backbone spec and the YAML catalog that holds one spec per model.

``catalogs/backbones.yaml`` has a top-level ``backbones:`` list; each entry is validated as a
``BackboneSpec`` and errors are reported as ``<file>: backbones[<i>] (<name>).<field>: ...``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stimage_embed.backbones.builder_needs import BUILDER_NEEDS, builders_reading
from stimage_embed.errors import CatalogError
from stimage_embed.paths import catalogs_dir

#: the builder names, from their declarations (:mod:`stimage_embed.backbones.builder_needs`)
Builder = Literal[tuple(BUILDER_NEEDS)]
Pooling = Literal["pooled", "cls", "cls_mean_patch", "layer3_avg"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "area"]
DType = Literal["fp32", "fp16", "bf16"]
CheckpointFormat = Literal["timm", "hf_vit", "hf_dinov2"]

#: Fields that only document a model; they do not change a single output number, so they are
#: left out of ``spec_hash`` (fixing a licence note must not invalidate cached vectors).
DOC_FIELDS = frozenset({"description", "licence", "reference", "notes", "gated", "source"})


class BackboneSpec(BaseModel):
    """One image encoder, declaratively: where its weights live, how to build it, how to feed it.

    ``input_size`` is the side in pixels of the square tile the model sees; ``mean``/``std``
    apply to RGB scaled to [0, 1]; ``embed_dim`` is the length of the pooled vector.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    builder: Builder
    hub_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
    hub_repo_type: Literal["model", "dataset"] = "model"
    #: Candidate weight files inside the hub repo, tried in order.
    weight_files: list[str] = Field(default_factory=lambda: ["model.safetensors", "pytorch_model.bin"], min_length=1)
    #: Python package that ships the weights or the model code (see the builder's ``BuilderNeeds``).
    package: str | None = None
    timm_name: str | None = None
    #: Keyword arguments for ``timm.create_model``. Layer names are strings (``mlp_layer: SwiGLUPacked``,
    #: ``act_layer: silu``); ``norm_eps`` becomes ``norm_layer=partial(LayerNorm, eps=norm_eps)``.
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Extra options for the builder itself (e.g. CONCH's ``proj_contrast``).
    builder_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint_format: CheckpointFormat = "timm"
    embed_dim: int = Field(gt=0)
    input_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bilinear"
    pooling: Pooling = "pooled"
    dtype: DType = "fp32"
    gated: bool = False
    licence: str = Field(min_length=1)
    reference: str = ""
    notes: str = ""
    #: The YAML file this spec came from (set by ``load_backbone_catalog``; not hashed).
    source: str | None = None

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"every std must be > 0, got {list(v)}")
        return v

    @field_validator("mean")
    @classmethod
    def _mean_unit(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not 0.0 <= m <= 1.0 for m in v):
            raise ValueError(f"mean is for RGB scaled to [0, 1]; got {list(v)}")
        return v

    @model_validator(mode="after")
    def _builder_needs(self) -> BackboneSpec:
        needs = BUILDER_NEEDS[self.builder]
        missing = [f for f in needs.spec_fields if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"builder {self.builder!r} needs {', '.join(missing)}")
        if self.checkpoint_format not in needs.checkpoint_formats:
            readers = " or ".join(repr(b) for b in builders_reading(self.checkpoint_format))
            raise ValueError(f"checkpoint_format {self.checkpoint_format!r} is only supported by builder {readers}")
        return self

    def hashed_fields(self) -> dict[str, Any]:
        """The fields that determine the vectors (everything but documentation), JSON-ready."""
        return self.model_dump(mode="json", exclude=set(DOC_FIELDS))

    def spec_hash(self) -> str:
        """Stable sha256 (hex) of the canonical JSON of ``hashed_fields()``."""
        canon = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @property
    def hub_url(self) -> str | None:
        if self.hub_id is None:
            return None
        prefix = "datasets/" if self.hub_repo_type == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.hub_id}"


def default_catalog_path() -> Path:
    """``<catalogs>/backbones.yaml`` (``$STIMAGE_CATALOGS`` overrides the catalogs folder)."""
    return catalogs_dir() / "backbones.yaml"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_backbone_catalog(path: str | Path | None = None) -> dict[str, BackboneSpec]:
    """Read and validate a backbone catalog; returns ``{name: spec}`` in file order.

    Raises ``CatalogError(file, field, message)`` naming the entry and the field at fault.
    """
    file = Path(path).expanduser() if path is not None else default_catalog_path()
    if not file.is_file():
        raise CatalogError(file, None, "backbone catalog not found")
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(file, None, f"not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("backbones"), list):
        raise CatalogError(file, "backbones", "expected a top-level 'backbones:' list of specs")
    specs: dict[str, BackboneSpec] = {}
    for i, entry in enumerate(doc["backbones"]):
        label = f"backbones[{i}]"
        if not isinstance(entry, dict):
            raise CatalogError(file, label, f"expected a mapping, got {type(entry).__name__}")
        if entry.get("name"):
            label += f" ({entry['name']})"
        try:
            spec = BackboneSpec.model_validate({**entry, "source": str(file)})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = _loc(tuple(err["loc"])) or "<spec>"
            more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise CatalogError(file, f"{label}.{field}", f"{err['msg']}{more}") from exc
        if spec.name in specs:
            raise CatalogError(file, f"{label}.name", f"duplicate backbone name {spec.name!r}")
        specs[spec.name] = spec
    if not specs:
        raise CatalogError(file, "backbones", "the catalog lists no backbones")
    return specs
