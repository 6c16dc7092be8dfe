import pytest
import torch

from devices.views import VIEWPOINTS, all_views, camera_view, normalize, tile_bounds
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


def test_view_of_one_frame_equals_view_in_batch(scenes):
    # Streaming computes a camera's view frame by frame; training computes it on batches.
    cfg = ModelConfig()
    for k in range(6):
        batch = camera_view(cfg, k, scenes)
        single = torch.cat([camera_view(cfg, k, scenes[i:i + 1]) for i in range(len(scenes))])
        assert torch.allclose(batch, single, atol=1e-6)


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
