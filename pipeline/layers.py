"""Building blocks shared by the camera, edge and cloud networks."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias, BN follows) -> BatchNorm -> optional ReLU; 'same' padding for odd kernels."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualLayer(nn.Module):
    """One 3x3 residual layer: y = relu(x + BN(conv3x3(x))), stride 1, padding 1.

    The paper's camera feature module is four of these; one conv per layer keeps the end
    device cheap."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = conv_bn(channels, channels, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs and an identity skip), used by the edge and the cloud."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, 3), conv_bn(channels, channels, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class Classifier(nn.Module):
    """Global average pool -> linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def forward_rows(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """`fn(x)` for a batch x, never run with a single row.

    On CPU, conv2d and linear take another code path for a batch of one (gemv instead of gemm),
    which changes results in the last bits; every batch of two or more rows gives each row the
    same numbers. A single row is therefore run twice and the first copy kept, so the streaming
    path (one frame at a time) reproduces offline evaluation (hundreds at a time) bit for bit."""
    if x.shape[0] != 1:
        return fn(x)
    out = fn(torch.cat([x, x]))
    if isinstance(out, tuple):
        return tuple(o[:1] if isinstance(o, torch.Tensor) else o for o in out)
    return out[:1]


@torch.no_grad()
def warm_up(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """Run `fn` once on `x` (through `forward_rows`) and drop the answer; the seconds it took.

    A network's first call in a process sets up its kernels (oneDNN primitives, the thread pool,
    allocations) and takes tens of times longer than the calls after it. A role makes that call
    before it takes traffic, so that no frame pays for it: a camera on a site clock would shed the
    frames that fall due meanwhile, an edge or cloud worker would hold its first frames past their
    deadlines and report a lag that makes the cameras shed."""
    t0 = time.perf_counter()
    forward_rows(fn, x)
    return time.perf_counter() - t0
