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
view of camera k, N x 3 x H x W in [0, 1]; `all_views` returns every camera's, bit for bit the
same pixels. `normalize` then standardises them for the network. Every transform is separable
and linear in the pixels, so each camera's is a pair of 32 x 32 matrices (`ViewPlan`) and the
six views of a batch are two matrix products and a few element-wise ops, with no Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

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
    """Normalised 1-D Gaussian taps (float64), radius ceil(3 sigma)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _bilinear(size: int, scale: float, center: float) -> torch.Tensor:
    """1-D resampling matrix (out x in) of `F.grid_sample` (bilinear, border, align_corners=False)
    along one axis of the affine map x_in = scale * x_out + center in [-1, 1] coordinates."""
    j = torch.arange(size, dtype=torch.float64)
    x_in = scale * ((2 * j + 1) / size - 1) + center
    pos = (((x_in + 1) * size - 1) / 2).clamp(0, size - 1)  # pixel coordinate; border padding clamps it
    return _interpolate_at(pos, size)


def _interpolate_at(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of linear interpolation weights at pixel coordinates `pos` (in [0, size - 1])."""
    lo = pos.floor().long().clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    w = pos - lo
    m = torch.zeros(len(pos), size, dtype=torch.float64)
    rows = torch.arange(len(pos))
    m[rows, lo] += 1 - w
    m[rows, hi] += w
    return m


def _shift(size: int, d: int) -> torch.Tensor:
    """Shift by d pixels towards higher indices, replicating the edge pixel (out x in)."""
    src = (torch.arange(size) - d).clamp(0, size - 1)
    return torch.eye(size, dtype=torch.float64)[src]


def _blur(size: int, sigma: float) -> torch.Tensor:
    """1-D Gaussian blur with replicated borders (out x in)."""
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    m = torch.zeros(size, size, dtype=torch.float64)
    for t, w in enumerate(k.tolist()):
        src = (torch.arange(size) + t - r).clamp(0, size - 1)
        m[torch.arange(size), src] += w
    return m


def _fixed_pattern(cam: int, shape: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + cam)
    return torch.randn(shape, generator=g)


def _viewpoint_axes(vp: Viewpoint, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) matrices of a viewpoint: zoom about its centre, shift, blur."""
    axes = []
    for center, d in ((vp.center_y, vp.shift_px[1]), (vp.center_x, vp.shift_px[0])):
        m = _bilinear(size, 1.0 / vp.zoom, center)
        m = _shift(size, d) @ m
        if vp.blur_sigma > 0:
            m = _blur(size, vp.blur_sigma) @ m
        axes.append(m)
    return axes[0], axes[1]


def _tile_axes(cam: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) matrices of tile `cam` resized to the scene (`F.interpolate`, bilinear,
    align_corners=False): crop and resize in one."""
    top, bottom, left, right = tile_bounds(size)[cam]
    axes = []
    for a, b in ((top, bottom), (left, right)):
        n = b - a
        src = ((torch.arange(size, dtype=torch.float64) + 0.5) * (n / size) - 0.5).clamp_min(0)
        m = torch.zeros(size, size, dtype=torch.float64)
        m[:, a:b] = _interpolate_at(src, n)
        axes.append(m)
    return axes[0], axes[1]


@dataclass(frozen=True)
class ViewPlan:
    """Every camera's view as tensors: view_k = finish_k(rows_k @ scene @ cols_k^T).

    Each transform of the table above is separable and linear in the pixels (resampling, shift,
    blur, crop), so it is one matrix per axis; what follows is per pixel (gamma, brightness and
    fixed-pattern noise on the cameras that have them, the post, the final clamp). All cameras
    then run as one matrix product, one batched product and a few element-wise ops, with no loop
    over cameras or frames."""

    rows: torch.Tensor  # cams x H x H
    cols_t: torch.Tensor  # cams x W x W, the column matrices transposed
    photometric: tuple[int, ...]  # cameras with gamma, brightness or noise
    gamma: torch.Tensor  # len(photometric) x 1 x 1 x 1; 1 = none
    brightness: torch.Tensor  # len(photometric) x 1 x 1 x 1, applied after the gamma
    noise: torch.Tensor  # len(photometric) x 3 x H x W: sigma times the camera's fixed pattern
    occluded: torch.Tensor  # cams x 1 x 1 x W bool: the columns the post hides

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ViewPlan":
        f = {k: getattr(self, k).to(device, dtype) for k in ("rows", "cols_t", "gamma", "brightness", "noise")}
        return ViewPlan(**f, photometric=self.photometric, occluded=self.occluded.to(device))

    def select(self, cams: list[int]) -> "ViewPlan":
        """The plan of some cameras only: the same numbers and the same operations per camera."""
        keep = [i for i, k in enumerate(self.photometric) if k in cams]
        return ViewPlan(self.rows[cams], self.cols_t[cams], tuple(cams.index(self.photometric[i]) for i in keep),
                        self.gamma[keep], self.brightness[keep], self.noise[keep], self.occluded[cams])


@lru_cache(maxsize=16)
def _cpu_plan(view_mode: str, num_cameras: int, size: int) -> ViewPlan:
    if view_mode == "tiles":
        axes = [_tile_axes(k, size) for k in range(num_cameras)]
        vps = [Viewpoint("tile")] * num_cameras
    else:
        if num_cameras > len(VIEWPOINTS):
            raise ValueError(f"viewpoints mode defines {len(VIEWPOINTS)} cameras, config has {num_cameras}")
        vps = list(VIEWPOINTS[:num_cameras])
        axes = [_viewpoint_axes(vp, size) for vp in vps]
    photometric = tuple(k for k, vp in enumerate(vps) if (vp.gamma, vp.brightness, vp.noise_sigma) != (1.0, 1.0, 0.0))
    occluded = torch.zeros(num_cameras, 1, 1, size, dtype=torch.bool)
    for k, vp in enumerate(vps):
        if vp.occlude_right > 0:
            occluded[k, ..., size - int(round(vp.occlude_right * size)):] = True
    return ViewPlan(
        rows=torch.stack([a[0] for a in axes]).float(),
        cols_t=torch.stack([a[1].T for a in axes]).float(),
        photometric=photometric,
        gamma=torch.tensor([vps[k].gamma for k in photometric]).view(-1, 1, 1, 1),
        brightness=torch.tensor([vps[k].brightness for k in photometric]).view(-1, 1, 1, 1),
        noise=torch.stack([vps[k].noise_sigma * _fixed_pattern(k, (3, size, size)) for k in photometric])
        if photometric else torch.zeros(0, 3, size, size),
        occluded=occluded,
    )


@lru_cache(maxsize=16)
def view_plan(view_mode: str, num_cameras: int, size: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> ViewPlan:
    """The plan of every camera of a configuration, on `device` (cached)."""
    return _cpu_plan(view_mode, num_cameras, size).to(device, dtype)


def render(plan: ViewPlan, scenes: torch.Tensor) -> torch.Tensor:
    """Float scenes N x 3 x H x H -> the plan's views N x cams x 3 x H x H, all in [0, 1]."""
    n, c, h, w = scenes.shape
    cams = plan.rows.shape[0]
    # Rows of every camera in one matrix product, then each camera's columns in one batched one;
    # in the scenes' dtype even under autocast, so that a view is the same in training and deployed.
    with torch.autocast(scenes.device.type, enabled=False):
        x = plan.rows.reshape(cams * h, h) @ scenes.permute(2, 0, 1, 3).reshape(h, n * c * w)
        x = torch.bmm(x.view(cams, h * n * c, w), plan.cols_t).view(cams, h, n, c, w)
    x = x.permute(2, 0, 3, 1, 4).contiguous()  # N x cams x 3 x H x W
    if plan.photometric:
        p = list(plan.photometric)
        x[:, p] = x[:, p].clamp(0, 1).pow(plan.gamma).mul(plan.brightness).add(plan.noise)
    return x.clamp_(0.0, 1.0).masked_fill_(plan.occluded, OCCLUDER_GREY)


def tile_bounds(size: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of the 3x2 tiles, row-major; columns split size into thirds."""
    cols = [round(i * size / 3) for i in range(4)]
    rows = [0, size // 2, size]
    return [(rows[r], rows[r + 1], cols[c], cols[c + 1]) for r in range(2) for c in range(3)]


def _plan(cfg: ModelConfig, scenes: torch.Tensor) -> ViewPlan:
    if scenes.ndim != 4 or scenes.shape[1] != 3 or scenes.shape[2] != scenes.shape[3]:
        raise ValueError(f"scenes must be N x 3 x H x H (square), got {tuple(scenes.shape)}")
    return view_plan(cfg.view_mode, cfg.num_cameras, scenes.shape[-1], str(scenes.device), scenes.dtype)


def camera_view(cfg: ModelConfig, cam: int, scenes: torch.Tensor) -> torch.Tensor:
    """The view of camera `cam` of float scenes in [0, 1], N x 3 x H x W."""
    if not 0 <= cam < cfg.num_cameras:
        raise ValueError(f"camera {cam} out of range 0..{cfg.num_cameras - 1}")
    return render(_plan(cfg, scenes).select([cam]), scenes)[:, 0]


def all_views(cfg: ModelConfig, scenes: torch.Tensor) -> torch.Tensor:
    """Views of every camera: N x num_cameras x 3 x H x W (the same numbers as `camera_view`)."""
    return render(_plan(cfg, scenes), scenes)


def normalize(views: torch.Tensor) -> torch.Tensor:
    """Standardise views (any leading dims, channels third from last) with CIFAR-10's statistics."""
    mean = torch.tensor(MEAN, device=views.device, dtype=views.dtype).view(3, 1, 1)
    std = torch.tensor(STD, device=views.device, dtype=views.dtype).view(3, 1, 1)
    return (views - mean) / std
