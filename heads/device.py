"""The one automatic device choice of the package (heads, and the embedding pass)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: ``cuda`` when a CUDA device is available, else ``cpu``; any other name
    (``"cpu"``, ``"cuda:1"``, ``"mps"``...) or a ``torch.device`` as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


__all__ = ["resolve_device"]
