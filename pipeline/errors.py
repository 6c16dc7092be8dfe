"""Every named error of ada-ddnn, in one place. `FrameError` and its kinds name the site, frame
and camera they are about; the others name the file, URL, setting or message at fault."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """Base of the streaming pipeline's errors."""


class ConnectError(PipelineError):
    """A broker (Mosquitto or Redis) cannot be reached after the retries allowed."""


class DataError(PipelineError):
    """The data set is missing, malformed or unsafe to load."""


class CheckpointError(PipelineError):
    """A checkpoint (or one of its parts) cannot be loaded into this code."""


class ServiceError(PipelineError):
    """A broker URL is malformed, or an embedded server could not be started."""


class SettingsError(PipelineError, ValueError):
    """A setting's text (env var or flag) that does not parse as its field's type."""


class MessageError(PipelineError, ValueError):
    """A message that cannot be encoded or decoded: malformed, oversized, wrong version or type."""


class FrameError(PipelineError):
    """Something went wrong with one frame (or one camera's part of it)."""

    def __init__(self, site: str, frame_id: int | None, message: str, camera: int | None = None) -> None:
        self.site = site
        self.frame_id = frame_id
        self.camera = camera
        parts = ([f"site {site!r}"] if site else []) + ([f"frame {frame_id}"] if frame_id is not None else []) + \
            ([f"camera {camera}"] if camera is not None else [])
        super().__init__(f"{' '.join(parts)}: {message}" if parts else message)


class CameraError(FrameError):
    """A camera cannot produce or publish an observation."""


class AggregationError(FrameError):
    """The edge cannot assemble or decide a frame."""


class EscalationError(FrameError):
    """The edge cannot hand a frame to the cloud (for example, the stream stays full)."""


class CloudError(FrameError):
    """A cloud worker cannot answer an escalated frame."""


class ReplayError(PipelineError):
    """The replay job cannot run or finish (bad arguments, frames missing at the end)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command had no handler of its own in place (start-up, a job such as
    replay): raised like Ctrl-C's KeyboardInterrupt, so `finally` blocks stop what was started."""


__all__ = ["PipelineError", "ConnectError", "DataError", "CheckpointError", "ServiceError", "SettingsError", "MessageError", "FrameError", "CameraError", "AggregationError", "EscalationError",
           "CloudError", "ReplayError", "Terminated"]
