import math

import pytest
import torch
import torch.nn.functional as F

from devices.views import OCCLUDER_GREY, VIEWPOINTS, all_views, camera_view, normalize, tile_bounds
from pipeline.config import ModelConfig


@pytest.fixture
def scenes():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("mode", ["viewpoints", "tiles"])
def test_views_deterministic_and_in_range(scenes, mode):
    cfg = ModelConfig(view_mode=mode)
    a = all_views(cfg, scenes)
    b = all_views(cfg, scenes.clone())
    assert a.shape == (4, 6, 3, 32, 32)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("mode", ["viewpoints", "tiles"])
def test_views_distinct_per_camera(scenes, mode):
    v = all_views(ModelConfig(view_mode=mode), scenes)
    for i in range(6):
        for j in range(i + 1, 6):
            assert (v[:, i] - v[:, j]).abs().mean() > 0.01, (i, j)


@pytest.mark.parametrize("mode", ["viewpoints", "tiles"])
def test_view_of_one_frame_and_one_camera_equals_all_views_in_batch(scenes, mode):
    # Streaming computes one camera's view frame by frame; training and offline evaluation
    # compute every camera's on batches: the pixels must be the same, bit for bit.
    cfg = ModelConfig(view_mode=mode)
    views = all_views(cfg, scenes)
    for k in range(6):
        assert torch.equal(camera_view(cfg, k, scenes), views[:, k])
        single = torch.cat([camera_view(cfg, k, scenes[i:i + 1]) for i in range(len(scenes))])
        assert torch.equal(single, views[:, k])


def _reference_viewpoint(cam: int, x: torch.Tensor) -> torch.Tensor:
    """The table of viewpoints written with grid_sample, padding and convolutions, one op after the other."""
    vp = VIEWPOINTS[cam]
    n, _, h, w = x.shape
    if (vp.zoom, vp.center_x, vp.center_y) != (1.0, 0.0, 0.0):
        s = 1.0 / vp.zoom
        theta = torch.tensor([[s, 0.0, vp.center_x], [0.0, s, vp.center_y]])
        grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    dx, dy = vp.shift_px
    if (dx, dy) != (0, 0):
        p = max(abs(dx), abs(dy))
        x = F.pad(x, (p, p, p, p), mode="replicate")[..., p - dy: p - dy + h, p - dx: p - dx + w]
    if vp.blur_sigma > 0:
        r = max(1, int(math.ceil(3 * vp.blur_sigma)))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * vp.blur_sigma ** 2))
        k = (k / k.sum()).float()
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    if vp.gamma != 1.0:
        x = x.clamp(0, 1).pow(vp.gamma)
    x = x * vp.brightness
    if vp.noise_sigma > 0:
        x = x + vp.noise_sigma * torch.randn((3, h, w), generator=torch.Generator().manual_seed(1000 + cam))
    if vp.occlude_right > 0:
        x = x.clone()
        x[..., w - int(round(vp.occlude_right * w)):] = OCCLUDER_GREY
    return x.clamp(0, 1)


def _reference_tile(cam: int, x: torch.Tensor) -> torch.Tensor:
    top, bottom, left, right = tile_bounds(x.shape[-1])[cam]
    return F.interpolate(x[..., top:bottom, left:right], size=x.shape[-2:], mode="bilinear",
                         align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("mode", ["viewpoints", "tiles"])
def test_views_are_the_documented_transforms(scenes, mode):
    # The views run as two matrix products per camera; written op by op they give the same
    # pixels up to float rounding (grid_sample computes its coordinates in float32).
    views = all_views(ModelConfig(view_mode=mode), scenes)
    ref = _reference_tile if mode == "tiles" else _reference_viewpoint
    for k in range(6):
        assert torch.allclose(views[:, k], ref(k, scenes), atol=1e-5), k


def test_placements_documented():
    assert len(VIEWPOINTS) == 6
    assert VIEWPOINTS[0].well_placed and VIEWPOINTS[1].well_placed
    assert sum(not v.well_placed for v in VIEWPOINTS) >= 2


def test_head_on_camera_sees_the_scene(scenes):
    assert torch.equal(camera_view(ModelConfig(), 0, scenes), scenes)


def test_occluded_camera_sees_grey_post(scenes):
    v = camera_view(ModelConfig(), 4, scenes)
    assert torch.all(v[..., -12:] == 0.5)


def test_tiles_partition_the_image():
    covered = torch.zeros(32, 32, dtype=torch.int32)
    for top, bottom, left, right in tile_bounds(32):
        covered[top:bottom, left:right] += 1
    assert torch.all(covered == 1)


def test_bad_camera_and_shape(scenes):
    with pytest.raises(ValueError):
        camera_view(ModelConfig(), 6, scenes)
    with pytest.raises(ValueError):
        camera_view(ModelConfig(), 0, scenes[:, :1])


def test_normalize_uses_cifar_statistics():
    x = torch.full((2, 6, 3, 4, 4), 0.5)
    n = normalize(x)
    assert n.shape == x.shape
    assert n[0, 0, 0, 0, 0].item() == pytest.approx((0.5 - 0.4914) / 0.2470, rel=1e-5)


def test_views_ignore_autocast(scenes):
    # Training runs the views inside bf16 autocast; they must still be the float32 views deployed.
    cfg = ModelConfig()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = all_views(cfg, scenes)
    assert views.dtype == torch.float32
    assert torch.equal(views, all_views(cfg, scenes))
