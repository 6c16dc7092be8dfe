"""The edge block and classifier (exit 2), run on fused camera features (8x8)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.checkpoint import load_part, read_config
from pipeline.config import ModelConfig
from pipeline.layers import BasicBlock, Classifier, conv_bn


class EdgeModule(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.edge_channels
        self.block = nn.Sequential(conv_bn(cfg.fused_channels, e, 3), *[BasicBlock(e) for _ in range(cfg.edge_blocks)])
        self.classifier = Classifier(e, cfg.num_classes)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(fused))


def load_edge(path: str, device: str | torch.device = "cpu") -> EdgeModule:
    """The edge part of the checkpoint at `path` (a full checkpoint or its `edge` part file)."""
    module = EdgeModule(read_config(path))
    load_part(path, "edge", module, device)
    return module
