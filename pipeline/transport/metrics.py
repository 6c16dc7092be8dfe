"""Prometheus metrics of one process, served on `/metrics` when its `--metrics-port` is set.

Each role keeps its counters where it already counts them (its `stats`); at scrape time the
collector here reads them through the role's `metric_samples()` (so a scrape costs the role's
loop nothing), and the decision latency, which needs every decision, is a histogram the role
observes as it decides. Every metric is labelled with the site; `METRICS` below is the one list
of names, kinds and help texts. The main ones:

    ada_observations_total{site}                    camera observations the edge took in
    ada_observations_rejected_total{site,reason}    late | duplicate | ahead (beyond the admission window)
    ada_frames_decided_total{site,exit}             exit1 | exit2 | cloud (edge: handed to the cloud)
    ada_frames_shed_total{site,reason}              frames cameras did not send, by reason (ShedNotices)
    ada_dead_letters_total{site}                    messages and frames sent to the dead letters
    ada_mqtt_reconnects_total{site}, ada_redis_outages_total{site},
    ada_redis_errors_total{site}
    ada_backlog{site,queue}                         inbox | open_frames | escalations | cloud_pending
    ada_decision_latency_seconds{site,exit}         capture -> decision (histogram)
    ada_camera_frames_total, ada_camera_published_total, ada_camera_bytes_total, ... (cameras)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Decision latency buckets (seconds): the edge's deadline is tens of ms, a cloud round trip on
# a CPU worker a few hundred ms, an overloaded site seconds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Sample:
    """One value of a metric family at scrape time."""

    name: str  # without the _total suffix of a counter
    kind: str  # "counter" or "gauge"
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class _RoleCollector(Collector):
    def __init__(self, samples: Callable[[], Iterable[Sample]]) -> None:
        self._samples = samples

    def collect(self):
        try:
            samples = list(self._samples())
        except Exception:  # a scrape must never take the process down; say why it came back short
            log.exception("metrics: reading the role's counters failed")
            return
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in samples:
            fam = families.get(s.name)
            if fam is None:
                cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                fam = families[s.name] = cls(s.name, s.help, labels=sorted(s.labels))
            fam.add_metric([s.labels[k] for k in sorted(s.labels)], s.value)
        yield from families.values()


class RoleMetrics:
    """A process's registry: the role's counters (read at scrape time) and its latency histogram."""

    def __init__(self, samples: Callable[[], Iterable[Sample]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RoleCollector(samples))
        self.latency = Histogram("ada_decision_latency_seconds", "capture -> decision, by exit", ["site", "exit"],
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._server = None
        self._thread: threading.Thread | None = None

    def observe(self, site: str, exit_name: str, seconds: float) -> None:
        self.latency.labels(site, exit_name).observe(max(0.0, seconds))

    def serve(self, port: int, host: str = "127.0.0.1") -> "RoleMetrics":
        """Serve /metrics on host:port in a daemon thread (port 0: do nothing)."""
        if port:
            try:
                self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as err:
                raise OSError(f"metrics: cannot serve on {host}:{port}: {err}") from err
            log.info("metrics on http://%s:%d/metrics", host, port)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# Every metric a role serves: name (a counter's without _total) -> (kind, help). The roles give
# names, values and labels (`sample`); kind and help live here only.
METRICS: dict[str, tuple[str, str]] = {
    "ada_backlog": ("gauge", "messages or frames waiting"),
    "ada_backpressure_waits": ("counter", "waits for room in the escalation stream"),
    "ada_camera_bytes": ("counter", "encoded observation bytes published"),
    "ada_camera_control_ignored": ("counter", "site clock and flow messages ignored: malformed, dated ahead, too many"),
    "ada_camera_feature_bytes": ("counter", "lazy upload: encoded feature answers published"),
    "ada_camera_feature_requests": ("counter", "lazy upload: feature requests naming these cameras"),
    "ada_camera_frames": ("counter", "frames captured (published or shed)"),
    "ada_camera_published": ("counter", "observations published"),
    "ada_camera_refused": ("counter", "observations dropped: too many waited for the broker"),
    "ada_camera_request_misses": ("counter", "lazy upload: features asked for and no longer kept"),
    "ada_camera_bad_requests": ("counter", "lazy upload: feature requests that failed validation, ignored"),
    "ada_camera_resent": ("counter", "messages the broker had acknowledged, published again after a reconnect"),
    "ada_sessions_taken_over": ("counter", "MQTT sessions of dead aggregators taken over and ended, their messages stored"),
    "ada_clock_skewed": ("counter", "observations whose capture time the edge's clock rules out (left out of its lag)"),
    "ada_frame_id_rewinds": ("counter", "times a camera's frame ids went back while its capture times went on (a replay run again)"),
    "ada_cloud_batches": ("counter", "forward passes"),
    "ada_dead_letters": ("counter", "messages and frames sent to the dead letters"),
    "ada_edge_block_runs": ("counter", "frames the edge block ran on"),
    "ada_escalated_bytes": ("counter", "encoded escalation bytes sent to the cloud"),
    "ada_escalations_read": ("counter", "escalation entries read"),
    "ada_escalations_reclaimed": ("counter", "entries reclaimed from a dead worker"),
    "ada_feature_requests": ("counter", "lazy upload: feature requests published"),
    "ada_features_missing": ("counter", "lazy upload: cameras asked whose features did not come in time"),
    "ada_frames_never_received": ("counter", "frame ids every camera's observations skipped, named lost after the grace"),
    "ada_qos0_dropped": ("counter", "QoS 0 messages dropped while the edge's inbox was backed up"),
    "ada_frames_decided": ("counter", "frames decided here (cloud: handed to the cloud)"),
    "ada_frames_reclaimed": ("counter", "frames taken over from an aggregator whose lease expired"),
    "ada_frames_shed": ("counter", "frames cameras named as not sent (ShedNotices), by reason"),
    "ada_mqtt_reconnects": ("counter", "MQTT connections after the first"),
    "ada_observations": ("counter", "camera observations taken in"),
    "ada_observations_rejected": ("counter", "observations refused"),
    "ada_redis_outages": ("counter", "loop turns that met Redis down"),
    "ada_redis_errors": ("counter", "loop turns Redis refused (a key of ours overwritten: WRONGTYPE), retried"),
}


def sample(name: str, value: float, **labels: str) -> Sample:
    """One value of a metric of `METRICS` (KeyError for a name that is not there)."""
    kind, help = METRICS[name]
    return Sample(name, kind, help, float(value), labels)
