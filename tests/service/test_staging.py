"""Staging uploads: images validated, zips guarded against traversal, links and bombs."""

from __future__ import annotations

import io
import stat
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from app.core.errors import ImageTooLarge
from app.service.errors import InvalidUpload, NoNominalImages, PayloadTooLarge, TooManyImages
from app.service.staging import StagingArea, UploadedFile


def png(seed: int = 0, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def zipped(entries: list[tuple[str | zipfile.ZipInfo, bytes]],
           compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def staging(tmp_path):
    return StagingArea(tmp_path / ".staging", max_image_pixels=10_000, max_images=10,
                       max_zip_uncompressed_bytes=200_000, max_zip_ratio=50)


def test_add_list_clear_and_dedup(staging):
    added = staging.add("bolt", [UploadedFile("../../a.png", png(1)), UploadedFile("b", png(2))])
    assert len(added) == 2
    assert all(a.path.parent == staging.folder("bolt") for a in added)
    assert len(staging.add("bolt", [UploadedFile("again.png", png(1))])) == 0
    assert len(staging.list("bolt")) == 2 and len(staging.paths("bolt")) == 2
    assert staging.clear("bolt") == 2
    with pytest.raises(NoNominalImages):
        staging.paths("bolt")


def test_zip_of_images(staging):
    data = zipped([("good/1.png", png(1)), ("good/2.png", png(2)), ("__MACOSX/._1.png", b"x"),
                   ("good/", b"")])
    assert len(staging.add("bolt", [UploadedFile("set.zip", data)])) == 2


def test_non_image_is_refused_and_nothing_is_written(staging):
    with pytest.raises(InvalidUpload):
        staging.add("bolt", [UploadedFile("a.png", png(1)), UploadedFile("b.txt", b"hello")])
    assert staging.list("bolt") == []


def test_decompression_bomb_image_is_refused(staging):
    with pytest.raises(ImageTooLarge):
        staging.add("bolt", [UploadedFile("big.png", png(1, size=200))])


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png",
                                  "..\\evil.png", "C:/evil.png"])
def test_zip_path_traversal_is_refused(staging, name):
    with pytest.raises(InvalidUpload, match="unsafe path"):
        staging.add("bolt", [UploadedFile("x.zip", zipped([(name, png(1))]))])


def test_zip_symlink_is_refused(staging):
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(InvalidUpload, match="symbolic link"):
        staging.add("bolt", [UploadedFile("x.zip", zipped([(info, b"/etc/passwd")]))])


def test_zip_bomb_ratio_and_total_are_refused(staging):
    bomb = zipped([("a.png", b"\0" * 150_000)])
    with pytest.raises(InvalidUpload, match="zip bomb"):
        staging.add("bolt", [UploadedFile("x.zip", bomb)])
    stored = zipped([(f"{i}.png", png(i, size=80)) for i in range(15)], zipfile.ZIP_STORED)
    with pytest.raises(PayloadTooLarge, match="zip bomb"):
        staging.add("bolt", [UploadedFile("x.zip", stored)])


def test_corrupt_zip_and_staging_limit(staging):
    with pytest.raises(InvalidUpload):
        staging.add("bolt", [UploadedFile("x.zip", b"PK\x03\x04 not really")])
    with pytest.raises(TooManyImages):
        staging.add("bolt", [UploadedFile(f"{i}.png", png(i)) for i in range(11)])


def _member_data_corrupted(compression: int) -> bytes:
    data = bytearray(zipped([("a.png", png(1, size=80))], compression))
    start = 30 + len("a.png")  # the local header, then the member's compressed bytes
    for i in range(start + 20, start + 200):
        data[i] = 0xFF if i % 2 else 0x00
    return bytes(data)


def _member_shorter_than_its_header() -> bytes:
    data = bytearray(zipped([("a.png", png(1, size=80))], zipfile.ZIP_STORED))
    claim = 4 * len(png(1, size=80))
    struct.pack_into("<II", data, 18, claim, claim)  # local header: compressed, uncompressed size
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<II", data, central + 20, claim, claim)
    return bytes(data)


@pytest.mark.parametrize("archive", [_member_data_corrupted(zipfile.ZIP_DEFLATED),
                                     _member_data_corrupted(zipfile.ZIP_LZMA), _member_shorter_than_its_header()],
                         ids=["deflate", "lzma", "short"])
def test_a_member_that_cannot_be_decompressed_is_the_clients_error(staging, archive):
    """zlib.error, LZMAError and EOFError once escaped as a 500."""
    with pytest.raises(InvalidUpload, match="cannot be read"):
        staging.add("bolt", [UploadedFile("x.zip", archive)])
    assert staging.list("bolt") == []
