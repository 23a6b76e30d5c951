"""The decode memory budget: concurrent reservations never exceed it."""

from __future__ import annotations

import threading
import time

import pytest

from app.service.budget import MemoryBudget
from app.service.errors import Overloaded


def test_reservations_never_exceed_the_budget():
    budget = MemoryBudget(100)
    peak = 0
    lock = threading.Lock()

    def decode(nbytes: int) -> None:
        nonlocal peak
        with budget.reserve(nbytes):
            with lock:
                peak = max(peak, budget.in_use)
            time.sleep(0.01)

    threads = [threading.Thread(target=decode, args=(n,)) for n in [40, 70, 30, 100, 250, 10] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert 0 < peak <= 100
    assert budget.in_use == 0


def test_a_reservation_that_cannot_be_met_in_time_is_overloaded():
    budget = MemoryBudget(10)
    with budget.reserve(10), pytest.raises(Overloaded), budget.reserve(1, timeout=0.05):
        pass
    with budget.reserve(10):  # released after the failure
        assert budget.in_use == 10
