"""A process-wide budget for the memory that decoding images takes.

Each image's decode footprint is estimated from its header (pixels x bytes per
pixel: the decoded array plus the decoder's own copy) and reserved before the
decode starts; when the budget is spent, further decodes wait until earlier ones
release theirs. So however many requests arrive at once, decoding never holds
more than the budget (one image larger than the whole budget runs alone).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app.service.errors import Overloaded

# uint8 RGB array (3) + PIL's internal 4-byte-per-pixel image (4) while converting.
DECODE_BYTES_PER_PIXEL = 7


class MemoryBudget:
    def __init__(self, total_bytes: int):
        if total_bytes < 1:
            raise ValueError("the budget must be positive")
        self.total = total_bytes
        self._free = total_bytes
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        """Hold `nbytes` (at most the whole budget) for the block; waits for room."""
        amount = max(0, min(int(nbytes), self.total))
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= amount, timeout):
                raise Overloaded("the server is busy decoding other large images; retry later",
                                 retry_after_s=1)
            self._free -= amount
        try:
            yield
        finally:
            with self._cond:
                self._free += amount
                self._cond.notify_all()
