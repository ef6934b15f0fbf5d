"""Speed helpers for the embedding pass: precision choice (autocast) and channels-last.

* GPU: the spec's ``dtype`` (fp16/bf16 -> autocast to it; fp32 -> none). No measurement.
* CPU: bf16 autocast only if, measured once on a probe batch, it is faster than fp32 AND every
  probe vector has cosine >= ``min_cosine`` (0.999) to its fp32 twin. Otherwise fp32.

The probe batch is real photographic content (random crops of scikit-learn's two sample
photographs), not noise, so the cosine reflects natural-image activations.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from stimage_embed.backbones.backbone import Backbone

log = logging.getLogger(__name__)

_SPEC_TO_TORCH = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ALIASES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


@dataclass(frozen=True)
class PrecisionDecision:
    """The precision chosen for a backbone on a device, and the measurement behind it.

    ``dtype`` is a torch dtype name (``float32``/``bfloat16``/``float16``); seconds are the
    median wall time of one forward of the probe batch.
    """

    dtype: str
    reason: str
    device: str
    batch_size: int | None = None
    fp32_seconds: float | None = None
    lowp_seconds: float | None = None
    speedup: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 RGB tiles (n, size, size, 3): random crops of sklearn's sample photographs."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    tiles = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[y : y + side, x : x + side])).permute(2, 0, 1)[None].float()
        crop = torch.nn.functional.interpolate(
            crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        tiles[i] = crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return torch.from_numpy(tiles)


def _time_forward(
    backbone: Backbone, x: torch.Tensor, dtype: torch.dtype | None, repeats: int
) -> tuple[float, torch.Tensor]:
    device_type = x.device.type
    ctx = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    times = []
    out = None
    with torch.inference_mode():
        with ctx():
            out = backbone(x)  # warm-up (also the output we compare)
        for _ in range(repeats):
            t0 = time.perf_counter()
            with ctx():
                backbone(x)
            if device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    assert out is not None
    return float(np.median(times)), out.float()


def autocast_dtype(
    backbone: Backbone,
    device: str | torch.device,
    batch_size: int = 32,
    repeats: int = 2,
    min_cosine: float = 0.999,
    probe: torch.Tensor | None = None,
) -> PrecisionDecision:
    """Choose the autocast precision for ``backbone`` on ``device`` (see module docstring).

    ``probe``: optional uint8 tiles (N, H, W, 3); default ``probe_tiles(batch_size, input_size)``.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        want = _SPEC_TO_TORCH[backbone.spec.dtype]
        if want == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            want = "float16"
        return PrecisionDecision(want, f"spec dtype {backbone.spec.dtype} on {dev.type}", str(dev))
    tiles = probe if probe is not None else probe_tiles(batch_size, backbone.input_size)
    x = backbone.preprocess(tiles.to(dev))
    t32, y32 = _time_forward(backbone, x, None, repeats)
    t16, y16 = _time_forward(backbone, x, torch.bfloat16, repeats)
    cos = torch.nn.functional.cosine_similarity(y32, y16, dim=1)
    cmin, cmean = float(cos.min()), float(cos.mean())
    faster = t16 < t32
    close = cmin >= min_cosine
    dtype = "bfloat16" if (faster and close) else "float32"
    reason = (
        f"bf16 {'faster' if faster else 'not faster'} ({t16:.3f} s vs fp32 {t32:.3f} s) and "
        f"cosine min {cmin:.5f} {'>=' if close else '<'} {min_cosine}"
    )
    decision = PrecisionDecision(
        dtype,
        reason,
        str(dev),
        int(x.shape[0]),
        round(t32, 4),
        round(t16, 4),
        round(t32 / t16, 3) if t16 > 0 else None,
        round(cmin, 6),
        round(cmean, 6),
    )
    log.info("%s precision on cpu: %s (%s)", backbone.name, dtype, reason)
    return decision


def choose_precision(
    backbone: Backbone, device: str | torch.device, requested: str = "auto"
) -> tuple[str, dict[str, Any]]:
    """``(torch dtype name, probe record)`` for the embedding pass.

    ``requested``: ``auto`` (measure / spec, see ``autocast_dtype``) or an explicit precision
    (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``), which is used as is.
    """
    key = _ALIASES.get(str(requested).lower())
    if key is None:
        raise ValueError(f"unknown precision {requested!r}; use one of auto, float32, bfloat16, float16")
    if key != "auto":
        return key, {"dtype": key, "reason": "requested", "device": str(torch.device(device))}
    decision = autocast_dtype(backbone, device)
    return decision.dtype, decision.as_dict()


def to_channels_last(backbone: Backbone) -> Backbone:
    """Put 4-D weights in channels-last memory format (faster convs on CPU and tensor cores)."""
    backbone.model.to(memory_format=torch.channels_last)
    return backbone
