import pytest

from pipeline.throttle import Throttle


def test_open_once_per_period_per_key():
    t = [100.0]
    gate = Throttle(5.0, clock=lambda: t[0])
    assert gate() and not gate()  # the first call opens, the next within the period does not
    assert gate("cam3") and not gate("cam3")  # keys have their own periods
    t[0] = 104.9
    assert not gate() and not gate("cam3")
    t[0] = 105.0
    assert gate() and not gate()  # a new period starts when the gate opens, not when it was asked
    assert gate("cam3")
    t[0] = 109.9
    assert not gate()


def test_period_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Throttle(0)
