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
