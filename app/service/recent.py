"""A small, bounded memory of recently flagged images, so that an operator can
send a confirmed false alarm back as feedback by its request id.

Only images the service flagged as anomalous are kept (a false alarm is one of
them), as the encoded bytes the client sent; the oldest go first once the total
exceeds the byte budget. A budget of 0 keeps nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from app.service.errors import RecentImageAmbiguous, RecentImageIndexNeeded, RecentImageNotFound
from app.service.staging import UploadedFile


@dataclass(frozen=True)
class RecentImage:
    product: str
    upload: UploadedFile | None   # None: the id came with two different images; which one is meant is unknown


class FlaggedImages(Protocol):
    """Where the service keeps recently flagged images for feedback by request id: this
    process's memory (`RecentImages`), or one memory for all of a cluster's replicas
    (app.cluster.flagged), so feedback finds the image whichever replica answered."""

    def remember(self, request_id: str | None, index: int, product: str, upload: UploadedFile) -> None: ...

    def get(self, product: str, request_id: str, index: int | None) -> UploadedFile: ...


# What an entry without an image (a reused id) counts against the budget, so reused ids
# cannot pile up unbounded.
MARKER_BYTES = 256


def _cost(item: RecentImage) -> int:
    return len(item.upload.data) if item.upload is not None else MARKER_BYTES


class RecentImages:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple[str, int], RecentImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, request_id: str | None, index: int, product: str, upload: UploadedFile) -> None:
        size = len(upload.data)
        if request_id is None or size > self.max_bytes:
            return
        key = (request_id, index)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= _cost(old)
            if old is not None and (old.upload is None or old.upload.data != upload.data or old.product != product):
                # The client chose the same X-Request-ID for another flagged image: staging
                # either one as nominal could be the wrong one (or a planted one), so neither is.
                item = RecentImage(product, None)
            else:
                item = RecentImage(product, upload)
            self._items[key] = item
            self._bytes += _cost(item)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= _cost(dropped)

    def get(self, product: str, request_id: str, index: int | None) -> UploadedFile:
        """The kept image; index None means "the request's only flagged image"."""
        with self._lock:
            if index is None:
                found = [(k, v) for k, v in self._items.items() if k[0] == request_id]
                if len(found) > 1:
                    raise RecentImageIndexNeeded(f"request {request_id[:64]!r} flagged {len(found)} images; "
                                              "give the index of the one to stage")
                item = found[0][1] if found else None
            else:
                item = self._items.get((request_id, index))
        if item is None or item.product != product:
            raise RecentImageNotFound(
                f"no flagged image of request {request_id[:64]!r}"
                + ("" if index is None else f" at index {index}")
                + f" for {product!r} is kept (only recent anomalous predictions are); upload the image instead")
        if item.upload is None:
            raise RecentImageAmbiguous(f"request id {request_id[:64]!r} was sent with more than one flagged "
                                       "image, so which one to stage is unknown; upload the image instead")
        return item.upload
