"""What each camera sees: deterministic transforms of the scene, batched, on any torch device.

Two modes, chosen by `ModelConfig.view_mode`:

`viewpoints` (default): all six cameras look at the whole scene from their own position. Each
view is a fixed function of the scene (no randomness at run time: the "sensor noise" is a
fixed-pattern noise seeded by the camera id), so a camera computes the same view in training,
offline evaluation and streaming.

| cam | placement | transform |
|-----|-----------|-----------|
| 0 | well placed, head-on | the scene as it is |
| 1 | well placed, slightly off-axis | zoom 1.10x, shifted 1 px right and 1 px down |
| 2 | poorly placed, too close, left | zoom 1.60x onto the left part of the scene (partial field of view), mild blur (sigma 0.6 px) |
| 3 | poorly placed, in the dark | low light (brightness x0.35, gamma 1.4) plus fixed-pattern sensor noise (sigma 0.04) |
| 4 | poorly placed, behind an obstacle | the right 40% of the view occluded by a grey post, shifted 2 px left |
| 5 | mediocre, out of focus and far | zoom 0.80x (scene smaller, borders replicated), blur (sigma 1.2 px) |

`tiles`: a 3x2 split of the image, after the one DDNN's public CIFAR-10 code uses (its exact
crop sizes are not reproduced): the scene cut into three columns and two rows, camera k sees
tile (row k // 3, column k % 3), resized back to the scene's size so that every camera runs the
same network.

`camera_view(cfg, k, scenes)` takes float scenes in [0, 1], N x 3 x H x W, and returns the
view of camera k, N x 3 x H x W in [0, 1]. `normalize` then standardises it for the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.data import MEAN, STD


@dataclass(frozen=True)
class Viewpoint:
    """One camera's placement. Zoom > 1 magnifies (narrower field of view); shifts are in
    pixels of the output view; center_x/center_y is the point of the scene the camera looks at,
    in [-1, 1] scene coordinates."""

    name: str
    zoom: float = 1.0
    center_x: float = 0.0
    center_y: float = 0.0
    shift_px: tuple[int, int] = (0, 0)  # (dx, dy) after the zoom
    blur_sigma: float = 0.0  # pixels
    brightness: float = 1.0  # multiplier after gamma
    gamma: float = 1.0  # > 1 darkens mid-tones
    noise_sigma: float = 0.0  # fixed-pattern noise, seeded by the camera id
    occlude_right: float = 0.0  # fraction of the view's width hidden at the right
    well_placed: bool = False


VIEWPOINTS: tuple[Viewpoint, ...] = (
    Viewpoint("head-on", well_placed=True),
    Viewpoint("off-axis", zoom=1.10, shift_px=(1, 1), well_placed=True),
    Viewpoint("too-close-left", zoom=1.60, center_x=-0.35, blur_sigma=0.6),
    Viewpoint("dark", brightness=0.35, gamma=1.4, noise_sigma=0.04),
    Viewpoint("behind-post", occlude_right=0.40, shift_px=(-2, 0)),
    Viewpoint("far-blurred", zoom=0.80, blur_sigma=1.2),
)
OCCLUDER_GREY = 0.5


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gaussian_kernel(sigma).to(x.device, x.dtype)
    c = x.shape[1]
    r = (len(k) - 1) // 2
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@lru_cache(maxsize=32)
def _fixed_pattern(cam: int, shape: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + cam)
    return torch.randn(shape, generator=g)


def _affine(x: torch.Tensor, vp: Viewpoint) -> torch.Tensor:
    if vp.zoom == 1.0 and vp.center_x == 0.0 and vp.center_y == 0.0:
        return x
    n, _, h, w = x.shape
    s = 1.0 / vp.zoom
    theta = torch.tensor([[s, 0.0, vp.center_x], [0.0, s, vp.center_y]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return padded[..., p - dy: p - dy + h, p - dx: p - dx + w]


def viewpoint_view(cam: int, scenes: torch.Tensor) -> torch.Tensor:
    vp = VIEWPOINTS[cam]
    x = _affine(scenes, vp)
    x = _shift(x, *vp.shift_px)
    if vp.blur_sigma > 0:
        x = _blur(x, vp.blur_sigma)
    if vp.gamma != 1.0:
        x = x.clamp(0, 1).pow(vp.gamma)
    if vp.brightness != 1.0:
        x = x * vp.brightness
    if vp.noise_sigma > 0:
        x = x + vp.noise_sigma * _fixed_pattern(cam, tuple(x.shape[1:])).to(x.device, x.dtype)
    if vp.occlude_right > 0:
        w = x.shape[-1]
        x = x.clone()
        x[..., w - int(round(vp.occlude_right * w)):] = OCCLUDER_GREY
    return x.clamp(0.0, 1.0)


def tile_bounds(size: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of the 3x2 tiles, row-major; columns split size into thirds."""
    cols = [round(i * size / 3) for i in range(4)]
    rows = [0, size // 2, size]
    return [(rows[r], rows[r + 1], cols[c], cols[c + 1]) for r in range(2) for c in range(3)]


def tile_view(cam: int, scenes: torch.Tensor) -> torch.Tensor:
    h, w = scenes.shape[-2:]
    top, bottom, left, right = tile_bounds(h)[cam]
    tile = scenes[..., top:bottom, left:right]
    return F.interpolate(tile, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def camera_view(cfg: ModelConfig, cam: int, scenes: torch.Tensor) -> torch.Tensor:
    """The view of camera `cam` of float scenes in [0, 1], N x 3 x H x W."""
    if not 0 <= cam < cfg.num_cameras:
        raise ValueError(f"camera {cam} out of range 0..{cfg.num_cameras - 1}")
    if scenes.ndim != 4 or scenes.shape[1] != 3:
        raise ValueError(f"scenes must be N x 3 x H x W, got {tuple(scenes.shape)}")
    if cfg.view_mode == "tiles":
        return tile_view(cam, scenes)
    if cfg.num_cameras > len(VIEWPOINTS):
        raise ValueError(f"viewpoints mode defines {len(VIEWPOINTS)} cameras, config has {cfg.num_cameras}")
    return viewpoint_view(cam, scenes)


def all_views(cfg: ModelConfig, scenes: torch.Tensor) -> torch.Tensor:
    """Views of every camera: N x num_cameras x 3 x H x W."""
    return torch.stack([camera_view(cfg, k, scenes) for k in range(cfg.num_cameras)], dim=1)


def normalize(views: torch.Tensor) -> torch.Tensor:
    """Standardise views (any leading dims, channels third from last) with CIFAR-10's statistics."""
    mean = torch.tensor(MEAN, device=views.device, dtype=views.dtype).view(3, 1, 1)
    std = torch.tensor(STD, device=views.device, dtype=views.dtype).view(3, 1, 1)
    return (views - mean) / std
