"""`ada-ddnn bench broker`: its docs section, and one configuration measured for real against a
Mosquitto container."""

import json
import os

import pytest

from pipeline.config import default_data_dir
from pipeline.orchestration.bench_broker import BrokerBenchConfig, bench_broker, reading, section, table, write_section
from pipeline.orchestration.bench_report import write_page
from tests import containers


def test_section_replaces_its_block_and_keeps_the_rest(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nintro\n")
    write_section(str(page), "## Broker\n\nfirst\n")
    write_section(str(page), "## Broker\n\nsecond\n")
    text = page.read_text()
    assert text.count("<!-- bench broker -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Benchmarks\n\nintro\n")


def test_bench_stream_page_keeps_the_broker_section(tmp_path, monkeypatch):
    page = tmp_path / "BENCHMARKS.md"
    write_section(str(page), "## Broker\n\nkept\n")
    monkeypatch.setattr("pipeline.orchestration.bench_report.render", lambda result, figure, folder: "# new page\n")
    write_page({}, str(page), None)
    text = page.read_text()
    assert text.startswith("# new page\n") and "kept" in text and text.count("<!-- /bench broker -->") == 1


def test_unknown_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown broker configurations"):
        BrokerBenchConfig(configs=("tuned", "fast"))


@pytest.mark.services
def test_one_configuration_against_a_container():
    if not containers.docker_answers() or containers.images()[0] != containers.LOCAL_MOSQUITTO:
        if os.environ.get("CI"):
            pytest.fail("bench broker must run in CI: no engine or no ada-ddnn/mosquitto:local image")
        pytest.skip("no Docker engine or no ada-ddnn/mosquitto:local image (scripts/docker-engine.sh up)")
    data = os.environ.get("ADA_DDNN_DATA", default_data_dir())
    if not os.path.exists(os.path.join(data, "cifar-10-batches-py", "test_batch")):
        if os.environ.get("ADA_DDNN_REQUIRE_DATA") == "1":
            pytest.fail(f"no CIFAR-10 at {data}")
        pytest.skip(f"no CIFAR-10 at {data}")
    result = bench_broker(BrokerBenchConfig(configs=("cpus-0.5",), messages=500, rate=50, seconds=2.0, templates=16,
                                            data=data))
    (row,) = result["rows"]
    assert row["config"] == "cpus-0.5" and row["cpus"] == 0.5
    assert row["raw"]["received"] == 500 and row["raw"]["dropped"] == 0
    p = row["pipeline"]
    assert p["frames"] == 100 and p["decided"] + p["shed_frames"] == 100 and p["lost"] == 0 and p["duplicates"] == 0
    assert all(code == 0 for code in row["exit_status"].values()), row["exit_status"]
    assert "| cpus-0.5 |" in table(result) and "without a loss" in reading(result)
    assert "Made by `ada-ddnn bench broker`" in section(result, "ada-ddnn bench broker")
    json.dumps(result)  # the report is plain JSON
