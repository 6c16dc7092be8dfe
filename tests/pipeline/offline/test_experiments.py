"""`ada-ddnn evaluate` end to end: tiny trained checkpoints, a tiny CIFAR-10 layout on disk."""

import json
import os
import pickle

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.data import load_cifar10
from pipeline.offline.train import train
from pipeline.orchestration.cli import main
from tests.helpers import tiny_config

VAL = 40  # validation frames held out of the 100 training images of the tiny layout

REPORT_KEYS = {"mode", "fusion", "trained_wire_dtype", "epochs_total", "checkpoint", "split", "n", "thresholds", "exit_rate", "accuracy", "bytes_per_frame",
               "missing_one", "missing_n", "sweep", "link"}
LINK_KEYS = {"uploads", "default_upload", "sample", "dtypes", "reference", "pareto", "equal_accuracy", "val_front"}
THRESHOLD_KEYS = {"t1", "t2", "chosen_on", "policy"}
EXIT_KEYS = {"exit1", "exit2", "cloud"}
ACCURACY_KEYS = {"edge", "cloud", "overall", "edge_all", "cloud_all", "cameras_all"}
BYTES_KEYS = {"camera_to_edge", "edge_to_cloud", "raw_views"}
MISSING_ONE_KEYS = {"camera", "edge", "cloud", "overall", "exit_rate"}
MISSING_N_KEYS = {"n", "overall_mean", "overall_std", "edge_mean", "cloud_mean"}
POINT_KEYS = {"t1", "t2", "edge_rate", "exit1_rate", "edge_n", "edge_acc", "overall"}
FIGURES = {"loss", "accuracy_epochs", "missing_one", "missing_n", "tradeoff", "bytes_pareto"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    layout = root / "data" / "cifar-10-batches-py"
    layout.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 40 if name == "test_batch" else 20
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(layout / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    data = load_cifar10(str(root / "data"), val_size=VAL)
    tc = TrainConfig(epochs=2, batch_size=20, val_size=VAL, augment=False)
    ckpts = {}
    for mode in ("ada", "ddnn"):
        ckpts[mode] = str(root / f"{mode}.safetensors")
        train(tiny_config(mode=mode), tc, data, out_path=ckpts[mode], progress=False)
    return root, ckpts


def _fractions_ok(x):
    return x is None or 0.0 <= x <= 1.0


def check_report(r: dict, mode: str, n: int) -> None:
    assert set(r) - {"run_wire_dtype"} == REPORT_KEYS
    assert (r["mode"], r["split"], r["n"]) == (mode, "test", n)
    assert set(r["thresholds"]) == THRESHOLD_KEYS and r["thresholds"]["chosen_on"] == "validation"
    assert (r["thresholds"]["t1"] is None) == (mode == "ddnn")
    assert set(r["exit_rate"]) == EXIT_KEYS
    assert sum(r["exit_rate"].values()) == pytest.approx(1.0)
    assert all(_fractions_ok(v) for v in r["exit_rate"].values())
    if mode == "ddnn":
        assert r["exit_rate"]["exit1"] == 0.0
    acc = r["accuracy"]
    assert set(acc) == ACCURACY_KEYS and len(acc["cameras_all"]) == 6
    assert all(_fractions_ok(acc[k]) for k in ACCURACY_KEYS - {"cameras_all"})
    assert all(_fractions_ok(v) for v in acc["cameras_all"])
    assert (acc["cameras_all"][0] is None) == (mode == "ddnn")
    b = r["bytes_per_frame"]
    assert set(b) == BYTES_KEYS
    assert b["raw_views"] == 6 * 3 * 32 * 32
    assert 0 < b["camera_to_edge"] < b["raw_views"]  # int8 features are smaller than the pixels
    assert b["edge_to_cloud"] >= 0
    assert [m["camera"] for m in r["missing_one"]] == list(range(6))
    for m in r["missing_one"]:
        assert set(m) == MISSING_ONE_KEYS and set(m["exit_rate"]) == EXIT_KEYS
        assert all(_fractions_ok(m[k]) for k in ("edge", "cloud", "overall"))
    assert [m["n"] for m in r["missing_n"]] == list(range(1, 7))
    for m in r["missing_n"]:
        assert set(m) == MISSING_N_KEYS
        assert all(_fractions_ok(m[k]) for k in ("overall_mean", "edge_mean", "cloud_mean"))
        assert m["overall_std"] >= 0
    assert set(r["sweep"]) == {"points", "pareto"}
    for p in r["sweep"]["points"] + r["sweep"]["pareto"]:
        assert set(p) == POINT_KEYS
        assert all(_fractions_ok(p[k]) for k in ("edge_rate", "edge_acc", "overall"))
    assert all(p in r["sweep"]["points"] for p in r["sweep"]["pareto"])
    check_link(r["link"], mode, r)


def check_link(link: dict, mode: str, r: dict) -> None:
    from pipeline.wire.messages import DTYPES

    assert set(link) == LINK_KEYS
    uploads = ["lazy", "eager"] if mode == "ada" else ["eager"]
    assert link["uploads"] == uploads and link["default_upload"] == uploads[0]
    rows = link["dtypes"]
    assert [row["wire_dtype"] for row in rows] == list(DTYPES)
    for u in uploads:
        every = [row["bytes_per_camera_frame"][u]["all"] for row in rows]
        assert every == sorted(every, reverse=True) and every[-1] < every[0] / 3  # fewer bits, fewer bytes
    for row in rows:
        assert sum(row["exit_rate"].values()) == pytest.approx(1.0)
        assert row["edge_runs_per_100_frames"] == pytest.approx(100 * (1 - row["exit_rate"]["exit1"]), abs=0.01)
        eager = row["bytes_per_camera_frame"]["eager"]
        assert eager["all"] == pytest.approx(row["messages"]["observation"], abs=0.2)
        if mode == "ddnn":
            assert row["bytes_per_camera_frame"]["lazy"] is None and row["messages"]["summary"] is None
            continue
        lazy = row["bytes_per_camera_frame"]["lazy"]
        assert lazy["exit1"] in (None, pytest.approx(row["messages"]["summary"], abs=0.2))  # summaries only
        for e in ("exit2", "cloud"):  # summary, the request each camera receives, the features
            assert lazy[e] in (None, pytest.approx(sum(row["messages"][k] for k in ("summary", "request", "features")),
                                                   abs=0.2))
    by_dtype = {row["wire_dtype"]: row for row in rows}
    assert by_dtype[r["run_wire_dtype"]]["accuracy"]["overall"] == pytest.approx(r["accuracy"]["overall"])
    for u in uploads:
        front = link["pareto"][u]
        assert [p["bytes"] for p in front] == sorted(p["bytes"] for p in front)
        assert [p["overall"] for p in front] == sorted(p["overall"] for p in front)


def test_evaluate_writes_reports_figures_and_results(setup, capsys, caplog):
    root, ckpts = setup
    out = root / "report"
    results = root / "docs" / "RESULTS.md"
    rc = main(["evaluate", "--checkpoint", ckpts["ada"], "--baseline", ckpts["ddnn"], "--out", str(out),
               "--data", str(root / "data"), "--limit", "30", "--bytes-sample", "8", "--draws", "5",
               "--results", str(results), "--device", "cpu"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    for sub, mode in (("", "ada"), ("baseline", "ddnn")):
        folder = out / sub
        report = json.loads((folder / "report.json").read_text())
        report["run_wire_dtype"] = "int8"
        check_report(report, mode, 30)
        optimistic = json.loads((folder / "optimistic.json").read_text())
        assert "optimistic" in optimistic["thresholds"]["chosen_on"]
        run = json.loads((folder / "run.json").read_text())
        assert run["wire_dtype"] == "int8" and run["validation_frames"] == 30
    assert set(printed["figures"]) == FIGURES
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = results.read_text()
    for text in ("84.70", "86.62", "67.41", "86.57", "optimistic", "Quick run", "../report/figures/tradeoff.png",
                 "The camera link", "14-30 bytes", "at equal overall accuracy", "(figures/bytes_pareto.png)"):
        assert text in page, text
    assert (results.parent / "figures" / "bytes_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "RESULTS.md").is_file()

    # --from-reports measures nothing (no data given) and writes the same page from the reports
    results.unlink()
    rc = main(["evaluate", "--checkpoint", ckpts["ada"], "--baseline", ckpts["ddnn"], "--out", str(out),
               "--data", str(root / "nowhere"), "--results", str(results), "--from-reports"])
    assert rc == 0
    again = results.read_text()
    assert "--from-reports" in again.split("\n")[2]
    assert again.split("\n")[3:] == page.split("\n")[3:]
    rc = main(["evaluate", "--checkpoint", ckpts["ddnn"], "--baseline", ckpts["ada"], "--out", str(out),
               "--results", "", "--from-reports"])
    assert rc != 0 and "pass the checkpoints in the order of the run" in caplog.text


def test_evaluate_one_checkpoint_with_another_policy_and_codec(setup, capsys):
    root, ckpts = setup
    out = root / "within"
    rc = main(["evaluate", "--checkpoint", ckpts["ada"], "--out", str(out), "--data", str(root / "data"),
               "--limit", "20", "--bytes-sample", "4", "--draws", "2", "--results", "", "--policy", "within-cloud",
               "--epsilon", "0.05", "--wire-dtype", "float16", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    report["run_wire_dtype"] = "float16"
    check_report(report, "ada", 20)
    assert "cloud-only" in report["thresholds"]["policy"]
    assert json.loads((out / "run.json").read_text())["wire_dtype"] == "float16"
    assert not os.path.exists(out / "baseline")


def test_evaluate_also_rows_name_their_fusion_and_use_their_trained_code(setup, capsys):
    """The paper's comparison beside ours: a max-fusion, 2-bit-trained checkpoint as an extra row."""
    root, ckpts = setup
    data = load_cifar10(str(root / "data"), val_size=VAL)
    extra = str(root / "ada-max-int2.safetensors")
    train(tiny_config(fusion="max", wire_dtype="int2"), TrainConfig(epochs=2, batch_size=20, val_size=VAL,  # setup's
                                                                    augment=False), data, out_path=extra, progress=False)
    out = root / "also"
    rc = main(["evaluate", "--checkpoint", ckpts["ada"], "--baseline", ckpts["ddnn"], "--also", extra, "--out", str(out),
               "--data", str(root / "data"), "--limit", "20", "--bytes-sample", "4", "--draws", "2", "--device", "cpu"])
    assert rc == 0
    assert len(json.loads(capsys.readouterr().out)["reports"]) == 3
    report = json.loads((out / "also0" / "report.json").read_text())
    assert (report["mode"], report["fusion"], report["trained_wire_dtype"]) == ("ada", "max", "int2")
    assert json.loads((out / "also0" / "run.json").read_text())["wire_dtype"] == "int2"  # --wire-dtype model
    assert json.loads((out / "run.json").read_text())["wire_dtype"] == "int8"  # trained without a code
    page = (out / "RESULTS.md").read_text()
    # the two ADA-DDNN checkpoints differ in fusion and in the code they were trained for: both named
    assert "| Ours, ADA-DDNN, max fusion, trained for int2 |" in page
    assert "| Ours, ADA-DDNN, concat fusion, trained for float32 |" in page
    assert "| Ours, DDNN |" in page
