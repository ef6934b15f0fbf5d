"""Exception types of the ``heads`` package (arrays only; no ``stimage_embed`` import)."""

from __future__ import annotations

from typing import Any


class ProvenanceMismatch(ValueError):
    """A head was trained on vectors of a different provenance than the ones offered.

    ``differences`` maps each differing key to ``(head_value, expected_value)``; a key
    absent on one side is reported as ``"<missing>"``.
    """

    def __init__(self, differences: dict[str, tuple[Any, Any]]):
        self.differences = dict(differences)
        parts = [f"{k}: head has {a!r}, expected {b!r}" for k, (a, b) in sorted(self.differences.items())]
        super().__init__("provenance mismatch: " + "; ".join(parts))
