import dataclasses

import torch

from devices.camera import CameraConfig
from pipeline.orchestration.loadgen import PreEncodedFeed, read_templates, write_templates
from pipeline.wire.messages import CameraObservation, FeatureTensor


def test_pre_encoded_observations_decode_as_the_real_ones(tmp_path):
    frames = [[CameraObservation("bench", f, k, 1.0, (f + k) % 10, 0.1 * k, FeatureTensor.quantize(torch.randn(12, 8, 8)),
                                 f % 10) for k in range(6)] for f in range(3)]
    path = str(tmp_path / "obs.msgpack")
    write_templates(path, frames)
    feed = PreEncodedFeed(CameraConfig(site="lab-2", cameras=(1, 4), stop=100), read_templates(path))
    out = feed.encode([7, 8], [1000.5, 1000.75])
    assert [[k for k, _ in frame] for frame in out] == [[1, 4], [1, 4]]
    for (frame_id, at), frame in zip(((7, 1000.5), (8, 1000.75)), out):
        for k, raw in frame:
            got = CameraObservation.decode(raw)  # the edge's own validation accepts it
            real = frames[frame_id % 3][k]
            assert raw == dataclasses.replace(real, site="lab-2", frame_id=frame_id, captured_at=at).encode()
            assert (got.site, got.frame_id, got.camera, got.captured_at) == ("lab-2", frame_id, k, at)
            assert (got.prediction, got.entropy, got.features, got.label) == (real.prediction, real.entropy,
                                                                              real.features, real.label)
