"""/metrics: the exporter itself, and an edge's counters moving while a replay runs."""

import re
import socket
import threading
import urllib.request

import pytest

from pipeline.orchestration.replay import ReplayConfig, metrics_ports, run_replay
from pipeline.transport.metrics import METRICS, RoleMetrics, sample


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels given must all match)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_exporter_serves_counters_gauges_and_latency():
    calls = []

    def samples():
        calls.append(1)
        return [sample("ada_observations", 7, site="s"), sample("ada_backlog", 3, site="s", queue="inbox"),
                sample("ada_frames_decided", 2, site="s", exit="exit1"),
                sample("ada_frames_decided", 5, site="s", exit="cloud")]

    port = free_ports(1)
    m = RoleMetrics(samples).serve(port)
    try:
        m.observe("s", "exit1", 0.02)
        m.observe("s", "exit1", 0.3)
        text = scrape(port)
        assert value(text, "ada_observations_total", site="s") == 7
        assert value(text, "ada_backlog", site="s", queue="inbox") == 3
        assert value(text, "ada_frames_decided_total", exit="cloud") == 5
        assert value(text, "ada_decision_latency_seconds_count", exit="exit1") == 2
        assert value(text, "ada_decision_latency_seconds_bucket", exit="exit1", le="0.025") == 1
        assert calls, "the role's counters are read at scrape time"
        with pytest.raises(OSError, match="cannot serve"):
            RoleMetrics(samples).serve(port)  # taken: a clear error, not a silent exporter-less process
    finally:
        m.close()


def test_every_metric_has_a_kind_and_a_help_and_no_other_name_is_taken():
    assert all(kind in ("counter", "gauge") and help for kind, help in METRICS.values())
    assert sample("ada_backlog", 1, site="s", queue="inbox").kind == "gauge"
    with pytest.raises(KeyError):
        sample("ada_not_a_metric", 1)


def test_a_broken_counter_reader_leaves_the_exporter_up():
    def samples():
        raise KeyError("boom")

    port = free_ports(1)
    m = RoleMetrics(samples).serve(port)
    try:
        assert "ada_decision_latency_seconds" in scrape(port)
    finally:
        m.close()


def test_metrics_ports_are_consecutive_by_role():
    assert metrics_ports(0, 2, 2, 1) == {"cloud": [], "edge": [], "cameras": []}
    assert metrics_ports(9000, 2, 3, 1) == {"cloud": [9000, 9001], "edge": [9002, 9003, 9004], "cameras": [9005]}


@pytest.mark.services
def test_edge_metrics_move_during_a_replay(stream_setup, brokers, site):
    path, model, data, _, _ = stream_setup
    base = free_ports(3)
    cfg = ReplayConfig(checkpoint=path, mqtt_url=brokers[0], redis_url=brokers[1], site=site, progress=False,
                       cloud_device="cpu", processes=False, n=600, fps=150, deadline_ms=2000, metrics_port=base)
    report: dict = {}
    t = threading.Thread(target=lambda: report.update(run_replay(cfg, data=data, model=model)), daemon=True)
    t.start()
    seen: list[float] = []  # the edge's observation counter, scrape after scrape
    while t.is_alive():
        try:
            v = value(scrape(base + 1), "ada_observations_total", site=site)
        except OSError:
            v = None  # not serving yet, or already closed
        if v is not None and (not seen or v != seen[-1]):
            seen.append(v)
        t.join(0.1)
    assert report["results"] == 600 and report["lost"] == 0
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0], seen
    assert seen[-1] <= 600 * 6
