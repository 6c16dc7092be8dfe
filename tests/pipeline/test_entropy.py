import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.entropy import normalized_entropy, normalized_entropy_probs


def test_uniform_is_one():
    for c in (2, 3, 10, 100):
        assert normalized_entropy(torch.zeros(1, c)).item() == pytest.approx(1.0, abs=1e-6)


def test_one_hot_is_zero():
    logits = torch.tensor([[1000.0, 0.0, 0.0, 0.0]])
    assert normalized_entropy(logits).item() == pytest.approx(0.0, abs=1e-6)


def test_known_value():
    # p = (0.5, 0.25, 0.25): H = 1.5 ln 2, |C| = 3 -> eta = 1.5 ln2 / ln3
    p = torch.tensor([[0.5, 0.25, 0.25]])
    expected = 1.5 * math.log(2) / math.log(3)
    assert normalized_entropy_probs(p).item() == pytest.approx(expected, rel=1e-6)
    assert normalized_entropy(p.log()).item() == pytest.approx(expected, rel=1e-6)


def test_probability_zero_terms_are_zero():
    assert normalized_entropy_probs(torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert normalized_entropy_probs(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item() == pytest.approx(0.5)


def test_needs_two_classes():
    with pytest.raises(ValueError):
        normalized_entropy(torch.zeros(3, 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=20))
def test_bounds_and_agreement(values):
    logits = torch.tensor([values], dtype=torch.float32)
    e = normalized_entropy(logits).item()
    assert 0.0 <= e <= 1.0
    assert normalized_entropy_probs(torch.softmax(logits, -1)).item() == pytest.approx(e, abs=1e-4)
