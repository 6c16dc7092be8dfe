"""The cloud block and classifier, run on the fused camera features the edge escalates.

    fused (8x8) -> conv -> blocks (96 ch, 8x8) -> strided conv -> blocks (192 ch, 4x4) -> pool -> linear
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.checkpoint import load_part, read_config
from pipeline.config import ModelConfig
from pipeline.layers import BasicBlock, Classifier, conv_bn


class CloudModule(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.cloud_channels
        self.block = nn.Sequential(
            conv_bn(cfg.fused_channels, d, 3),
            *[BasicBlock(d) for _ in range(cfg.cloud_blocks)],
            conv_bn(d, 2 * d, 3, stride=2),
            *[BasicBlock(2 * d) for _ in range(cfg.cloud_blocks)],
        )
        self.classifier = Classifier(2 * d, cfg.num_classes)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(fused))


def load_cloud(path: str, device: str | torch.device = "cpu") -> CloudModule:
    """The cloud part of the checkpoint at `path` (a full checkpoint or its `cloud` part file)."""
    module = CloudModule(read_config(path))
    load_part(path, "cloud", module, device)
    return module
