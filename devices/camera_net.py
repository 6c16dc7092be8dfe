"""The network on one camera: feature module (four 3x3 residual layers), classifier, wire bottleneck.

    view 3x32x32 -> stem conv (stride 2) -> 4 x ResidualLayer (32 ch, 16x16)
                 -> classifier head: two strided 3x3 convs (16->8->4), pool, linear   [ADA only]
                 -> wire bottleneck: 1x1 conv to 12 channels, average-pool to 8x8     [sent to the edge]

The features a camera sends are the bottleneck's output (signed, BN-normalised, 12 x 8 x 8 by
default): 768 int8 values per frame on the wire instead of the 3,072 bytes of the raw view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import load_part, read_config
from pipeline.config import ModelConfig
from pipeline.layers import Classifier, ResidualLayer, conv_bn


class CameraModule(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.camera_channels
        self.wire_size = cfg.wire_size
        self.stem = conv_bn(3, c, 3, stride=cfg.camera_stem_stride)
        self.features = nn.Sequential(*[ResidualLayer(c) for _ in range(cfg.camera_residual_layers)])
        self.bottleneck = conv_bn(c, cfg.wire_channels, 1, relu=False)
        self.classifier: nn.Module | None = None
        if cfg.has_camera_classifiers:
            h = cfg.camera_head_channels
            self.classifier = nn.Sequential(
                conv_bn(c, h, 3, stride=2),
                conv_bn(h, 2 * h, 3, stride=2),
                Classifier(2 * h, cfg.num_classes),
            )

    def forward(self, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised view N x 3 x H x W -> (wire features N x K x S x S, logits N x C or None)."""
        x = self.features(self.stem(view))
        wire = F.adaptive_avg_pool2d(self.bottleneck(x), self.wire_size)
        logits = self.classifier(x) if self.classifier is not None else None
        return wire, logits


def load_camera(path: str, camera: int, device: str | torch.device = "cpu") -> CameraModule:
    """Camera `camera`'s part of the checkpoint at `path` (a full checkpoint or its `camera{k}` part file)."""
    module = CameraModule(read_config(path))
    load_part(path, f"camera{camera}", module, device)
    return module
