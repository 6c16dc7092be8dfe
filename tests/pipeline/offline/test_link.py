"""The camera link's trade-off (`pipeline.offline.link`): thresholds finer than the policy's grid
where the exit-1 share, and with it lazy upload's bytes, moves most."""

from __future__ import annotations

import torch

from pipeline.offline import evaluation, link
from pipeline.offline.evaluation import CameraPass
from pipeline.offline.network import AdaDDNN
from tests.helpers import tiny_config


def confident_cameras(n: int, seed: int) -> CameraPass:
    """Six cameras whose lowest entropy a frame lies under the policy grid's first step (0.025),
    spread evenly from 0 to it, as with the release checkpoint's camera classifiers."""
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(n, 6, generator=g) * 0.5 + 0.1
    ent[torch.arange(n), torch.randint(0, 6, (n,), generator=g)] = torch.rand(n, generator=g) * 0.025
    labels = torch.randint(0, 10, (n,), generator=g)
    return CameraPass(labels, torch.randn(n, 6, 4, 8, 8, generator=g), ent, torch.randint(0, 10, (n, 6), generator=g),
                      None)


def test_the_trade_off_grid_holds_the_policy_grid_and_finer_steps_under_its_first():
    fine = link.trade_off_grid(evaluation.THRESHOLD_GRID)
    assert set(evaluation.THRESHOLD_GRID) <= set(fine) and list(fine) == sorted(set(fine))
    under_first = [t for t in fine if 0 < t < evaluation.THRESHOLD_GRID[1]]
    assert len(under_first) >= 10 and min(under_first) <= 0.001


def test_fronts_reach_exit1_shares_between_the_policy_grids_steps_and_rows_keep_the_policys_thresholds():
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config(num_cameras=6)).eval()
    policy = dict(policy="edge-accuracy", min_edge_accuracy=0.0, min_edge_rate=0.0, epsilon=0.0, min_exit1_rate=0.0,
                  confidence=0.0)
    out = link.wire_ladder(model, confident_cameras(300, 1), confident_cameras(300, 2), policy, torch.device("cpu"),
                           batch_size=100, sample=20, dtypes=("int8",))
    # Every frame has a camera under 0.025: on the policy's grid exit 1 takes none (T1 0) or all of them.
    runs = {p["edge_runs_per_100_frames"] for p in out["val_front"]["lazy"]}
    assert any(5 < r < 95 for r in runs), runs
    assert any(0 < p["t1"] < 0.025 for p in out["val_front"]["lazy"])
    # The row's thresholds are the policy's choice on its own grid, as a model card's are.
    val_c = evaluation.fuse_pass(model, link.coded(confident_cameras(300, 1), "int8"), device=torch.device("cpu"),
                                 batch_size=100)
    want = evaluation.select_thresholds(evaluation.sweep(val_c), cloud_only=evaluation.cloud_only_accuracy(val_c),
                                        **policy)
    assert out["dtypes"][0]["thresholds"] == {"t1": want["t1"], "t2": want["t2"]}
    assert want["t1"] in evaluation.THRESHOLD_GRID and want["t2"] in evaluation.THRESHOLD_GRID
