import pytest

from pipeline.orchestration.bench_scale import bench_cloud, bench_redis
from pipeline.transport.redis_client import redis_client
from pipeline.wire import names

pytestmark = pytest.mark.services


def test_bench_scale_drives_the_frame_store_and_a_cloud_worker(stream_setup, brokers, site, redis_conn):
    sites = [site, f"{site[:50]}-b"]
    clouds = [f"{site[:50]}-c{i}" for i in range(2)]
    try:
        out = bench_redis(redis_client(brokers[1]), sites, frames=100, cloud_share=0.1)
        assert out["frames"] == 200 and out["redis_cpu_s"] >= 0
        for s in sites:  # every frame recorded once (exit 2 or the cloud's answer), the stream emptied
            assert redis_conn.xlen(names.results_stream(s)) == 100
            assert redis_conn.xlen(names.escalations_stream(s)) == 0
            assert redis_conn.xlen(names.losses_stream(s)) == 600  # then 100 frames every camera shed
        assert isinstance(out["memory_bytes_per_decided_frame"], int) and isinstance(out["memory_bytes_per_shed_frame"], int)
        cloud = bench_cloud(brokers[1], clouds, stream_setup[0], n=50, batch=16)
        assert cloud["escalations"] == 50 and cloud["frames_per_s"] > 0
    finally:
        for s in sites + clouds:
            keys = list(redis_conn.scan_iter(match=names.site_pattern(s), count=1000))
            if keys:
                redis_conn.delete(*keys)
