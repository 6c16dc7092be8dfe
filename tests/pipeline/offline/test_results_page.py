from pipeline.offline.results_page import edge_rate_at_accuracy


def test_edge_rate_at_accuracy_takes_the_best_point_reaching_the_level():
    pts = [
        {"edge_rate": 0.9, "edge_acc": 0.85},
        {"edge_rate": 0.7, "edge_acc": 0.91},
        {"edge_rate": 0.5, "edge_acc": 0.95},
        {"edge_rate": 0.0, "edge_acc": None},
    ]
    assert edge_rate_at_accuracy(pts, 0.80) == 0.9
    assert edge_rate_at_accuracy(pts, 0.90) == 0.7
    assert edge_rate_at_accuracy(pts, 0.95) == 0.5
    assert edge_rate_at_accuracy(pts, 0.99) is None


def _entry(mode, trained, fusion, upload, front):
    pts = [{"wire_dtype": d, "t1": t1, "t2": 0.0, "val_overall": v, "val_bytes": b, "overall": v - 0.001, "bytes": b,
            "edge_runs_per_100_frames": 50.0} for d, t1, v, b in front]
    return {"report": {"mode": mode, "fusion": fusion, "trained_wire_dtype": trained, "checkpoint": f"{mode}-{trained}",
                       "link": {"val_front": {upload: pts}}}}


def test_equal_accuracy_pools_every_checkpoint_of_a_mode_and_fusion():
    from pipeline.offline.results_page import pooled_front

    entries = [
        _entry("ada", "int2", "concat", "lazy", [("int1", 0.05, 0.850, 110.0), ("int2", 0.05, 0.856, 160.0)]),
        _entry("ddnn", "int2", "concat", "eager", [("int1", None, 0.856, 168.0), ("int2", None, 0.868, 264.0)]),
        _entry("ada", "int1", "concat", "lazy", [("int1", 0.05, 0.858, 106.0)]),
        _entry("ddnn", "int1", "concat", "eager", [("int1", None, 0.862, 168.0)]),
        _entry("ada", "int2", "max", "lazy", [("int1", 0.9, 0.99, 1.0)]),  # another fusion: not pooled
    ]
    a, a_from = pooled_front(entries, "ada", "lazy", "concat")
    assert a_from == ["ada-int2", "ada-int1"]
    # the int1-trained checkpoint's 106 bytes at 85.8% beat both of the int2-trained one's points
    assert [(p["trained"], p["val_bytes"]) for p in a] == [("int1", 106.0)]
    d, _ = pooled_front(entries, "ddnn", "eager", "concat")
    # at 168 bytes the int1-trained DDNN is the better (86.2% against 85.6%); 264 bytes reach 86.8%
    assert [(p["trained"], p["val_overall"]) for p in d] == [("int1", 0.862), ("int2", 0.868)]


def test_labels_tell_checkpoints_of_a_mode_apart_by_what_differs():
    from pipeline.offline.figures import label

    def e(mode, fusion, trained):
        return {"report": {"mode": mode, "fusion": fusion, "trained_wire_dtype": trained}}

    a, d = e("ada", "concat", "int2"), e("ddnn", "concat", "int2")
    assert [label(x, [a, d]) for x in (a, d)] == ["ADA-DDNN", "DDNN"]
    amax, a1 = e("ada", "max", "int2"), e("ada", "concat", "int1")
    assert label(amax, [a, amax]) == "ADA-DDNN, max fusion"
    entries = [a, d, amax, a1]
    assert [label(x, entries) for x in (a, amax, a1)] == [
        "ADA-DDNN, concat fusion, trained for int2", "ADA-DDNN, max fusion, trained for int2",
        "ADA-DDNN, concat fusion, trained for int1"]
    twin = e("ada", "concat", "int2")
    assert label(twin, [a, twin]) == "ADA-DDNN (baseline)"
    shorter = {"report": {**a["report"], "epochs_total": 35}}
    longer = {"report": {**a["report"], "epochs_total": 49}}
    assert [label(x, [longer, shorter]) for x in (longer, shorter)] == ["ADA-DDNN, 49 epochs", "ADA-DDNN, 35 epochs"]
    once = {"report": {**a["report"], "epochs_total": 1}}
    assert label(once, [longer, once]) == "ADA-DDNN, 1 epoch"


def test_the_level_table_prices_each_accuracy_for_both_modes():
    from pipeline.offline.results_page import communication

    entries = [
        _entry("ada", "int2", "concat", "lazy", [("int1", 0.05, 0.852, 100.0), ("int2", 0.025, 0.8605, 176.0)]),
        _entry("ddnn", "int2", "concat", "eager", [("int1", None, 0.8598, 160.0), ("int2", None, 0.868, 256.0)]),
    ]
    for e in entries:
        e["report"]["link"].update({"dtypes": [], "sample": 10, "reference": {"overall": 0.85}})
    for p in entries[1]["report"]["link"]["val_front"]["eager"]:
        p["t2"] = 0.0
    page = "\n".join(communication(entries))
    # at DDNN's own 160-byte point (85.98%) ADA-DDNN needs 176 bytes: -10%
    assert "| int1, T2 0.000 | 85.98 / 85.88 | 160 | 50 | int2, T1 0.025, T2 0.000 | 86.05 / 85.95 | 176 | 50.0 | -10.0% |" in page
    # asked for 85.0%, DDNN still pays its 160-byte step and ADA-DDNN 100 bytes: 37.5% saved
    assert "| 85.0% | int1, T2 0.000 | 85.98 / 85.88 | 160 | int1, T1 0.050, T2 0.000 | 85.20 / 85.10 | 100 | 37.5% |" in page
    assert "| 86.5% | int2, T2 0.000 | 86.80 / 86.70 | 256 | not reached | - | - | - |" in page
    # 84.0, 84.5, 85.0 (100 against 160) and 86.0 (176 against DDNN's 256: its 1-bit step tops at 85.98) save
    # 30% or more; 85.5 (176 against 160) does not
    assert "| 86.0% | int2, T2 0.000 | 86.80 / 86.70 | 256 | int2, T1 0.025, T2 0.000 | 86.05 / 85.95 | 176 | 31.2% |" in page
    assert "saves -10.0% to +37.5%, at least 30% at 4 of the 5 levels" in page
    assert "| 87.0% |" not in page  # neither mode reaches it: no row
