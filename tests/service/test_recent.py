"""The bounded memory of flagged images behind feedback by request id."""

import pytest

from app.service.errors import RecentImageAmbiguous, RecentImageNotFound
from app.service.recent import MARKER_BYTES, RecentImages
from app.service.staging import UploadedFile


def test_a_retried_request_keeps_its_image_and_a_reused_id_keeps_none():
    recent = RecentImages(max_bytes=1000)
    first = UploadedFile("a.png", b"a" * 100)
    recent.remember("cam1-42", 0, "washer", first)
    recent.remember("cam1-42", 0, "washer", UploadedFile("a.png", b"a" * 100))  # a client's retry
    assert recent.get("washer", "cam1-42", 0).data == first.data and recent.size_bytes == 100
    recent.remember("cam1-42", 0, "washer", UploadedFile("b.png", b"b" * 100))   # the id reused
    with pytest.raises(RecentImageAmbiguous):
        recent.get("washer", "cam1-42", 0)
    recent.remember("cam1-42", 0, "washer", first)  # once ambiguous, stays so until it ages out
    with pytest.raises(RecentImageAmbiguous):
        recent.get("washer", "cam1-42", None)
    assert recent.size_bytes == MARKER_BYTES  # a marker counts too, so reused ids cannot pile up
    for i in range(12):  # the budget pushes the oldest entries out, the ambiguous one too
        recent.remember(f"r{i}", 0, "washer", UploadedFile("c.png", b"c" * 100))
    with pytest.raises(RecentImageNotFound):
        recent.get("washer", "cam1-42", 0)
    assert recent.size_bytes <= 1000


def test_feedback_without_an_index_on_a_request_with_two_flagged_images_asks_for_it():
    """Both images are kept: 'not found' (404) told the client the wrong thing."""
    from app.service.errors import RecentImageIndexNeeded, status_and_code

    recent = RecentImages(max_bytes=1000)
    recent.remember("cam1-7", 0, "washer", UploadedFile("a.png", b"a" * 10))
    recent.remember("cam1-7", 1, "washer", UploadedFile("b.png", b"b" * 10))
    with pytest.raises(RecentImageIndexNeeded, match="give the index") as refused:
        recent.get("washer", "cam1-7", None)
    assert status_and_code(refused.value) == (422, "index_required")
    assert recent.get("washer", "cam1-7", 1).data == b"b" * 10
