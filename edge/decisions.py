"""The edge's decision for claimed frames, as a pure function: exit 1 (the most confident
camera), else fusion + the edge block + exit 2, else "cloud". No I/O; `edge.aggregator` does
that around it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge.edge_net import EdgeModule
from edge.exits import EXIT1, EXIT2, decide
from edge.fusion import fuse
from pipeline.entropy import normalized_entropy
from pipeline.layers import forward_rows
from pipeline.wire.messages import CameraObservation

REFUSED = "refused"  # a frame whose numbers are not finite: dead-lettered, never decided


@dataclass
class Frame:
    """A claimed frame: its observations, sorted by camera."""

    frame_id: int
    observations: list[CameraObservation]
    reclaimed: bool = False  # taken over from an owner whose lease expired

    @property
    def present(self) -> tuple[int, ...]:
        return tuple(o.camera for o in self.observations)

    @property
    def captured_at(self) -> float:
        return min(o.captured_at for o in self.observations)

    @property
    def label(self) -> int | None:
        return next((o.label for o in self.observations if o.label is not None), None)


@torch.no_grad()
def decide_frames(edge: EdgeModule, frames: list[Frame], t1: float | None, t2: float,
                  device: torch.device = torch.device("cpu")) -> tuple[list[tuple[str, int, float, int | None]],
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit 1, then fusion + edge + exit 2, for claimed frames; pure (no I/O).

    Returns ([(exit name, prediction, entropy, camera or None)], fused, edge entropy, edge
    prediction); the caller escalates the frames whose exit is "cloud" and dead-letters those
    marked REFUSED (non-finite numbers). Numbers match offline evaluation: same camera order,
    same fusion, batches never of one row."""
    cfg = edge.cfg
    n, cams = len(frames), cfg.num_cameras
    features = torch.zeros(n, cams, *cfg.wire_shape)
    present = torch.zeros(n, cams, dtype=torch.bool)
    cam_entropy = torch.ones(n, cams)
    cam_pred = torch.zeros(n, cams, dtype=torch.long)
    for i, fr in enumerate(frames):
        for o in fr.observations:
            features[i, o.camera] = o.features.to_tensor()
            present[i, o.camera] = True
            if o.entropy is not None:
                cam_entropy[i, o.camera] = o.entropy
                cam_pred[i, o.camera] = o.prediction  # type: ignore[assignment]
    fused = fuse(features, present, cfg.fusion)
    edge_logits = forward_rows(edge, fused.to(device)).float().cpu()
    edge_entropy, edge_pred = normalized_entropy(edge_logits), edge_logits.argmax(-1)
    has_cams = cfg.has_camera_classifiers
    d = decide(t1 if has_cams else None, t2, edge_entropy, edge_pred, torch.zeros(n, dtype=torch.long),
               cam_entropy if has_cams else None, cam_pred if has_cams else None, present)
    # A frame whose features or edge output are not finite (numbers no camera of ours produces)
    # is refused alone: its neighbours in the batch are decided as usual.
    bad = ~(torch.isfinite(fused).flatten(1).all(dim=1) & torch.isfinite(edge_logits).all(dim=1))
    out = []
    for i in range(n):
        e = int(d.exit[i])
        if bool(bad[i]):
            out.append((REFUSED, -1, float("nan"), None))
        elif e == EXIT1:
            cam = int(d.camera[i])
            out.append(("exit1", int(d.prediction[i]), float(cam_entropy[i, cam]), cam))
        elif e == EXIT2:
            out.append(("exit2", int(d.prediction[i]), float(edge_entropy[i]), None))
        else:
            out.append(("cloud", -1, float(edge_entropy[i]), None))
    return out, fused, edge_entropy, edge_pred
