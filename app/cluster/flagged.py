"""Flagged images for feedback by request id, kept once for all replicas.

A replica remembers each image it flags as anomalous (the encoded bytes its client
sent) so that an operator can stage a confirmed false alarm by the X-Request-ID of
its answer (POST /v1/admin/products/{p}/feedback). With several replicas, that
feedback call reaches any of them, so the memory cannot be a replica's own: it is
one named detached actor, `FlaggedBoard`, holding the same bounded memory as the
single process (app.service.recent.RecentImages, oldest out first beyond
PATCHCORE_FEEDBACK_CACHE_MB). A replica hands each flagged image to it without
waiting; a crash of the actor forgets the images (Ray restarts it empty), as a
restart of the single process does.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from app.cluster import FLAGGED_BOARD_NAME, NAMESPACE
from app.service.errors import RecentImageAmbiguous, RecentImageNotFound
from app.service.recent import RecentImages
from app.service.settings import Settings
from app.service.staging import UploadedFile

logger = logging.getLogger(__name__)

GET_TIMEOUT_S = 30.0


class FlaggedBoard:
    """The cluster's memory of flagged images: a RecentImages behind an actor's one thread."""

    def __init__(self, max_bytes: int):
        self.images = RecentImages(max_bytes)

    def remember(self, request_id: str, index: int, product: str, filename: str, data: bytes,
                 content_type: str | None) -> None:
        self.images.remember(request_id, index, product, UploadedFile(filename, data, content_type))

    def get(self, product: str, request_id: str, index: int | None) -> dict:
        try:
            upload = self.images.get(product, request_id, index)
        except RecentImageNotFound as exc:
            return {"not_found": str(exc)}
        except RecentImageAmbiguous as exc:
            return {"ambiguous": str(exc)}
        return {"file": (upload.filename, upload.data, upload.content_type)}

    def size(self) -> dict:
        return {"images": len(self.images), "bytes": self.images.size_bytes}


RemoteFlaggedBoard = ray.remote(num_cpus=0, max_restarts=-1)(FlaggedBoard)


def flagged_board(max_bytes: int) -> Any:
    """The cluster's one board: created by the first replica, found by name after that."""
    return RemoteFlaggedBoard.options(name=FLAGGED_BOARD_NAME, namespace=NAMESPACE, lifetime="detached",
                                      get_if_exists=True).remote(max_bytes)


class ClusterFlaggedImages:
    """The replica's side (app.service.recent.FlaggedImages): every call goes to the board."""

    def __init__(self, settings: Settings):
        self.board = flagged_board(int(settings.feedback_cache_mb * 1024 * 1024))

    def remember(self, request_id: str | None, index: int, product: str, upload: UploadedFile) -> None:
        if request_id is None:
            return
        try:  # not awaited: a prediction never waits for the board
            self.board.remember.remote(request_id, index, product, upload.filename, upload.data,
                                       upload.content_type)
        except Exception as exc:  # noqa: BLE001 - the answer matters more than the memory of it
            logger.warning("flagged image of request %s not kept: %s", request_id[:64], exc)

    def get(self, product: str, request_id: str, index: int | None) -> UploadedFile:
        reply = ray.get(self.board.get.remote(product, request_id, index), timeout=GET_TIMEOUT_S)
        if "not_found" in reply:
            raise RecentImageNotFound(reply["not_found"])
        if "ambiguous" in reply:
            raise RecentImageAmbiguous(reply["ambiguous"])
        filename, data, content_type = reply["file"]
        return UploadedFile(filename, data, content_type)
