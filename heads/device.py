"""The one automatic device choice of the package (heads, the embedding pass, the CLI checks),
and the one test of whether a named device exists on this machine."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: ``cuda`` when a CUDA device is available, else ``cpu``; any other name
    (``"cpu"``, ``"cuda:1"``, ``"mps"``...) or a ``torch.device`` as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_unavailable(device: str | torch.device) -> str | None:
    """Why ``device`` cannot run on this machine (``"this machine has no CUDA GPU (torch sees
    none)"``, ``"this machine has 1 CUDA device(s)"`` for ``cuda:3``), or ``None`` when it can;
    ``"auto"`` and non-CUDA devices always can (``torch.device`` raises on an unknown name)."""
    if isinstance(device, str) and device == "auto":
        return None
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (dev.index or 0) < n:
        return None
    return f"this machine has {n} CUDA device(s)" if n else "this machine has no CUDA GPU (torch sees none)"


__all__ = ["device_unavailable", "resolve_device"]
