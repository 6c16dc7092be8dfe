"""Redis URLs: one Redis or a Redis Cluster (`redis+cluster://`). The cluster client itself runs
against a real six-node cluster in tests/faults/test_cluster_failover.py."""

import pytest

from pipeline.errors import ConnectError
from pipeline.transport.embedded import free_port
from pipeline.transport.redis_client import Heartbeat, cluster_nodes, is_cluster_url, redis_client, safe_url
from pipeline.wire import names


def test_cluster_urls_name_their_start_up_nodes():
    url = "redis+cluster://ada:s3cret@10.0.0.1:7000, redis-b:7001,[::1]:7002"
    assert is_cluster_url(url) and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:6379/0") and not is_cluster_url("rediss://h:6379")
    assert cluster_nodes(url) == [("10.0.0.1", 7000), ("redis-b", 7001), ("::1", 7002)]
    assert "s3cret" not in safe_url(url)


@pytest.mark.parametrize("bad", ["redis+cluster://h1:7000,h2", "redis+cluster://h1:7000/3", "redis+cluster://:7000",
                                 "redis://h:1"])
def test_a_bad_cluster_url_is_refused(bad):
    with pytest.raises(ValueError):
        cluster_nodes(bad)


def test_a_cluster_nobody_answers_fails_after_its_timeout():
    with pytest.raises(ConnectError, match="unavailable"):
        redis_client(f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(ConnectError, match="Redis URL"):
        redis_client("redis+cluster://127.0.0.1:1,nohost", timeout_s=0.5)


@pytest.mark.parametrize("bad, reason", [("redis://127.0.0.1:6379/abc", "database 'abc' is not a number"),
                                         ("redis://", "no host")])
def test_a_url_redis_py_would_take_silently_is_refused(bad, reason):
    with pytest.raises(ConnectError, match=reason):
        redis_client(bad, timeout_s=0.5)


def test_a_cluster_url_to_a_plain_redis_fails_at_once(brokers):
    # A server without cluster mode never becomes a cluster by waiting: named, not retried for timeout_s.
    from urllib.parse import urlsplit

    u = urlsplit(brokers[1])
    with pytest.raises(ConnectError, match="not a cluster.*use redis://"):
        redis_client(f"redis+cluster://{u.hostname}:{u.port or 6379}", timeout_s=30)


@pytest.mark.services
def test_a_heartbeat_at_many_sites_sets_every_key_in_one_round_trip(redis_conn):
    import json
    import uuid

    sites = [f"hb-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    hb = Heartbeat(redis_conn, sites[0], "cloud", "cloud-x", interval_s=2.0, info=lambda: {"answered": 7})
    for site in sites[1:]:
        hb.add_site(site)
    keys = [names.heartbeat_key(site, "cloud", "cloud-x") for site in sites]
    redis_conn.delete(*keys)
    calls = []
    execute = redis_conn.execute_command
    redis_conn.execute_command = lambda *a, **kw: calls.append(a) or execute(*a, **kw)
    try:
        hb.beat()
    finally:
        del redis_conn.execute_command
    assert calls == []  # the three SETs went in one pipeline, not a command each
    for key in keys:
        body = json.loads(redis_conn.get(key))
        assert body["id"] == "cloud-x" and body["answered"] == 7
        assert 0 < redis_conn.pttl(key) <= 6000
    redis_conn.delete(*keys)


def test_a_port_nobody_listens_on_is_named_without_a_tls_hint():
    """Connection refused: nothing listens there, so 'a TLS port needs rediss://' would mislead."""
    with pytest.raises(ConnectError, match="unreachable") as err:
        redis_client(f"redis://127.0.0.1:{free_port()}", timeout_s=0.3)
    assert "refused" in str(err.value).lower() and "rediss://" not in str(err.value)
