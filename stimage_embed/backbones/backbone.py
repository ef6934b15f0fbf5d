"""``Backbone``: a loaded encoder with its input transform and pooling, ready for the embedding pass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stimage_embed.backbones.pooling import get_strategy
from stimage_embed.backbones.spec import BackboneSpec
from stimage_embed.backbones.weights import WeightsSource


class Backbone(nn.Module):
    """A backbone: ``preprocess`` uint8 tiles, ``forward`` them to ``(N, embed_dim)`` vectors.

    Attributes: ``spec`` (the spec actually built, overrides applied), ``model`` (the timm /
    adapter module, eval mode), ``embed_dim``, ``input_size`` (pixels), ``mean``/``std`` (for RGB
    in [0, 1]), ``weights_path``, ``weights_source`` and ``weights_sha256`` (sha256 of the file loaded).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        weights_sha256: str,
        weights_path: str,
        weights_source: WeightsSource,
    ):
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        self.embed_dim = spec.embed_dim
        self.input_size = spec.input_size
        self.mean = tuple(float(m) for m in spec.mean)
        self.std = tuple(float(s) for s in spec.std)
        self.interpolation = spec.interpolation
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.weights_source = weights_source
        self._pool = get_strategy(spec.pooling).pool
        # (x_uint8 * scale + shift) == (x / 255 - mean) / std, per channel; buffers follow .to(device)
        std = torch.tensor(self.std, dtype=torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32)
        self.register_buffer("_scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return self._scale.device

    def preprocess(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 RGB tiles (N, H, W, 3) -> float32 (N, 3, input_size, input_size), normalised.

        Steps: NHWC -> NCHW view (memory stays channels-last, no copy); float; resize to
        ``input_size`` with the spec's interpolation (antialiased when shrinking) only if H or W
        differ; then ``(x / 255 - mean) / std`` as one fused multiply-add. The input is moved to
        the backbone's device first.
        """
        x = batch_uint8_nhwc
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"preprocess expects (N, H, W, 3) RGB tiles, got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"preprocess expects uint8 tiles, got {x.dtype}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        size = self.input_size
        if x.shape[-2:] != (size, size):
            mode = self.interpolation
            kwargs: dict[str, Any] = {}
            if mode in ("bilinear", "bicubic"):
                kwargs = {"align_corners": False, "antialias": x.shape[-2] > size or x.shape[-1] > size}
            x = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
            if mode == "bicubic":  # bicubic overshoots; keep values in the uint8 range like PIL
                x = x.clamp_(0.0, 255.0)
        x = torch.addcmul(self._shift, x, self._scale)
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch (N, 3, S, S) -> pooled embeddings (N, embed_dim)."""
        return self._pool(self.model, x)

    @torch.inference_mode()
    def embed(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """Convenience: ``forward(preprocess(tiles))`` without autograd, float32 on CPU-or-device."""
        return self.forward(self.preprocess(batch_uint8_nhwc)).float()

    def transform_description(self) -> dict[str, Any]:
        """The input transform, for provenance (JSON-ready)."""
        return {
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "antialias_when_shrinking": self.interpolation in ("bilinear", "bicubic"),
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": "uint8/255",
            "pooling": self.spec.pooling,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, input_size={self.input_size}"
