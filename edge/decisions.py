"""The edge's decision for claimed frames, as a pure function: exit 1 (the most confident
camera), else fusion + the edge block + exit 2, else "cloud"; with lazy upload, a frame that
does not leave at exit 1 first needs its cameras' features ("request"). No I/O;
`edge.aggregator` does that around it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from edge.edge_net import EdgeModule
from edge.exits import exit1_choice, under
from edge.fusion import fuse
from pipeline.entropy import normalized_entropy
from pipeline.layers import forward_rows
from pipeline.wire.messages import CameraFeatures, CameraObservation, CameraSummary

REFUSED = "refused"  # a frame whose numbers are not finite: dead-lettered, never decided
REQUEST = "request"  # lazy upload: no exit 1, and cameras whose features the edge does not have yet


@dataclass
class Frame:
    """A claimed frame: the cameras whose features the edge has (an eager observation, or a
    summary with the features it asked for) and, with lazy upload, those it has only a summary of."""

    frame_id: int
    observations: list[CameraObservation]  # by camera: features, prediction and entropy
    reclaimed: bool = False  # taken over from an owner whose lease expired
    summaries: list[CameraSummary] = field(default_factory=list)  # by camera: prediction and entropy only
    requested: bool = False  # its features were asked for: decide it now with those that came
    asked: tuple[int, ...] = ()  # the cameras whose features were asked for (a requested frame)
    nbytes: int = 0  # encoded size of the messages it was assembled from (what the cameras sent for it)

    @property
    def blind(self) -> bool:
        """Its features were asked for and none came: its cameras' verdicts are all it has."""
        return self.requested and not self.observations and bool(self.summaries)

    @property
    def present(self) -> tuple[int, ...]:
        """The cameras its decision uses: exit 1 looks at every camera's verdict until the
        features were asked for; after that, the cameras whose features came (or, for a frame
        none of whose features came, the cameras whose verdicts answer it)."""
        cams = {o.camera for o in self.observations}
        if not self.requested or self.blind:
            cams |= {s.camera for s in self.summaries}
        return tuple(sorted(cams))

    @property
    def wanted(self) -> tuple[int, ...]:
        """Cameras to ask for their features (summaries without features)."""
        return tuple(s.camera for s in self.summaries)

    @property
    def missing(self) -> tuple[int, ...]:
        """Cameras asked for features that did not come (a requested frame's summaries)."""
        return self.wanted if self.requested else ()

    @property
    def captured_at(self) -> float:
        """When the frame was captured: its cameras' capture times agree (a site clock), so the
        middle one (the lower of two) stands for them, and a camera whose clock is wrong cannot
        move it unless it is half of them."""
        return statistics.median_low(o.captured_at for o in (*self.observations, *self.summaries))

    @property
    def label(self) -> int | None:
        return next((o.label for o in (*self.observations, *self.summaries) if o.label is not None), None)


def assemble(frame_id: int, messages: list, reclaimed: bool = False, requested: bool = False) -> Frame:
    """A Frame from a frame's stored messages (CameraObservation, CameraSummary, CameraFeatures):
    a summary and the features of the same camera make one observation."""
    obs: dict[int, CameraObservation] = {}
    summaries: dict[int, CameraSummary] = {}
    feats: dict[int, CameraFeatures] = {}
    for m in messages:
        if isinstance(m, CameraObservation):
            obs[m.camera] = m
        elif isinstance(m, CameraSummary):
            summaries[m.camera] = m
        elif isinstance(m, CameraFeatures):
            feats[m.camera] = m
    asked = tuple(sorted(k for k in summaries if k not in obs)) if requested else ()
    for k, s in list(summaries.items()):
        if k in obs:
            del summaries[k]
        elif k in feats:
            obs[k] = CameraObservation(s.site, s.frame_id, k, s.captured_at, s.prediction, s.entropy, feats[k].features,
                                       s.label)
            del summaries[k]
    return Frame(int(frame_id), [obs[k] for k in sorted(obs)], reclaimed, [summaries[k] for k in sorted(summaries)],
                 requested, asked)


@torch.no_grad()
def decide_frames(edge: EdgeModule, frames: list[Frame], t1: float | None, t2: float,
                  device: torch.device = torch.device("cpu")) -> tuple[list[tuple[str, int, float, int | None]],
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit 1, then fusion + edge + exit 2, for claimed frames; pure (no I/O).

    Returns ([(exit name, prediction, entropy, camera or None)], fused, edge entropy, edge
    prediction); the caller escalates the frames whose exit is "cloud", asks for the features of
    those marked REQUEST and dead-letters those marked REFUSED (non-finite numbers). The edge
    block runs only on the frames that need it (not those leaving at exit 1, nor those waiting
    for features): their edge entropy is NaN and prediction -1. Numbers match offline
    evaluation: same camera order, same fusion, batches never of one row. A batch of lazy
    frames at their first look (summaries only) takes `decide_on_verdicts`, without tensors."""
    if edge.cfg.has_camera_classifiers and all(_verdicts_only(fr) for fr in frames):
        return decide_on_verdicts(edge, frames, t1)
    return _decide_tensors(edge, frames, t1, t2, device)


def _verdicts_only(fr: Frame) -> bool:
    """Lazy upload's first look at a frame: summaries only, features not yet asked for."""
    return not fr.observations and not fr.requested and bool(fr.summaries)


def decide_on_verdicts(edge: EdgeModule, frames: list[Frame], t1: float | None
                       ) -> tuple[list[tuple[str, int, float, int | None]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decide_frames` for frames that are summaries only (lazy upload, not yet asked for features):
    exit 1 or REQUEST, the same answers as the tensor path, in plain Python (a frame's first look
    is on the latency path of every lazy frame; the tensor path's set-up costs about 0.2 ms).
    Equal to it: entropies are float32 values (the wire rounds them), compared with T1 rounded to
    float32 as a float32 tensor compares with a Python float; ties go to the lowest camera."""
    n = len(frames)
    limit = None if t1 is None or t1 >= 1.0 else float(np.float32(t1))
    out: list[tuple[str, int, float, int | None]] = []
    for fr in frames:
        best = min(fr.summaries, key=lambda s: (s.entropy, s.camera))
        if t1 is not None and (limit is None or best.entropy < limit):
            out.append(("exit1", best.prediction, best.entropy, best.camera))
        else:
            out.append((REQUEST, -1, float("nan"), None))
    return (out, torch.zeros(n, edge.cfg.fused_channels, *edge.cfg.wire_shape[1:]),
            torch.full((n,), float("nan")), torch.full((n,), -1, dtype=torch.long))


def _decide_tensors(edge: EdgeModule, frames: list[Frame], t1: float | None, t2: float, device: torch.device
                    ) -> tuple[list[tuple[str, int, float, int | None]], torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = edge.cfg
    n, cams = len(frames), cfg.num_cameras
    features = torch.zeros(n, cams, *cfg.wire_shape)
    # Built as lists and made tensors once (per-element tensor writes cost more than the decision).
    present = [[False] * cams for _ in range(n)]  # cameras whose features the edge has
    known = [[False] * cams for _ in range(n)]  # cameras whose verdict exit 1 may use
    cam_entropy = [[1.0] * cams for _ in range(n)]
    cam_pred = [[0] * cams for _ in range(n)]
    waiting = [False] * n
    # Asked for features and none came by the second deadline: the cameras' own verdicts (their
    # summaries) are all the frame has, so its most confident camera answers, whatever T1 says,
    # rather than the edge block on all-zero features (one class for every such frame).
    blind = [False] * n
    for i, fr in enumerate(frames):
        for o in fr.observations:
            features[i, o.camera] = o.features.to_tensor()
            present[i][o.camera] = known[i][o.camera] = True
            if o.entropy is not None:
                cam_entropy[i][o.camera] = o.entropy
                cam_pred[i][o.camera] = o.prediction  # type: ignore[assignment]
        if not fr.requested or fr.blind:
            for s in fr.summaries:
                known[i][s.camera] = True
                cam_entropy[i][s.camera], cam_pred[i][s.camera] = s.entropy, s.prediction
            blind[i] = fr.blind
            waiting[i] = bool(fr.summaries) and not fr.blind
    present_t, known_t = torch.tensor(present, dtype=torch.bool), torch.tensor(known, dtype=torch.bool)
    cam_entropy_t = torch.tensor(cam_entropy, dtype=torch.float32)
    waiting_t, blind_t = torch.tensor(waiting, dtype=torch.bool), torch.tensor(blind, dtype=torch.bool)
    if cfg.has_camera_classifiers:
        best, cam = exit1_choice(cam_entropy_t, known_t)
        fire1 = ((under(best, t1) if t1 is not None else torch.zeros(n, dtype=torch.bool)) | blind_t) & (cam >= 0)
    else:
        cam = torch.full((n,), -1, dtype=torch.long)
        fire1 = torch.zeros(n, dtype=torch.bool)
    waiting_t &= ~fire1
    run = ~fire1 & ~waiting_t
    fused = fuse(features, present_t, cfg.fusion)
    edge_entropy = torch.full((n,), float("nan"))
    edge_pred = torch.full((n,), -1, dtype=torch.long)
    # A frame whose features or edge output are not finite (numbers no camera of ours produces)
    # is refused alone: its neighbours in the batch are decided as usual.
    bad = ~torch.isfinite(fused).flatten(1).all(dim=1)
    rows = run.nonzero().flatten()
    if len(rows):
        logits = forward_rows(edge, fused[rows].to(device)).float().cpu()
        edge_entropy[rows], edge_pred[rows] = normalized_entropy(logits), logits.argmax(-1)
        bad[rows] |= ~torch.isfinite(logits).all(dim=1)
    out: list[tuple[str, int, float, int | None]] = []
    exit2 = under(edge_entropy, t2).tolist()
    entropies, preds, cam_entropy_f32 = edge_entropy.tolist(), edge_pred.tolist(), cam_entropy_t.tolist()
    for i, (refused, first, k, wait) in enumerate(zip(bad.tolist(), fire1.tolist(), cam.tolist(), waiting_t.tolist())):
        if refused:
            out.append((REFUSED, -1, float("nan"), None))
        elif first:
            out.append(("exit1", int(cam_pred[i][k]), cam_entropy_f32[i][k], k))
        elif wait:
            out.append((REQUEST, -1, float("nan"), None))
        elif exit2[i]:
            out.append(("exit2", preds[i], entropies[i], None))
        else:
            out.append(("cloud", -1, entropies[i], None))
    return out, fused, edge_entropy, edge_pred
