"""Nominal-image staging sets, one folder per product under <models>/.staging/<product>/.

Uploads are validated completely before anything is written: every file must
decode as an image within the pixel limit. Files are stored under the hash of
their content (no client-chosen names ever reach the file system), so
re-uploading an image is a no-op. Zip archives are read member by member with
guards against path traversal, links, and zip bombs (total size, compression
ratio, member count, and a bounded read that does not trust the header).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import shutil
import stat
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.core.errors import ImageTooLarge, InvalidImage
from app.core.images import IMAGE_SUFFIXES, SUFFIX_OF_FORMAT, decode_image, probe_image
from app.service.errors import InvalidUpload, NoNominalImages, PayloadTooLarge, TooManyImages

ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
_SKIPPED_ZIP_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class StagedImage:
    name: str
    size: int
    path: Path

    def describe(self) -> dict:
        return {"name": self.name, "size_bytes": self.size}


def _image_suffix(data: bytes) -> str:
    """Suffix from the decoded format (one of the accepted ones), not from the client's filename."""
    fmt, _, _ = probe_image(data)
    return SUFFIX_OF_FORMAT[fmt]


class StagingArea:
    def __init__(self, root: Path, *, max_image_pixels: int, max_images: int,
                 max_zip_uncompressed_bytes: int, max_zip_ratio: float):
        self.root = Path(root)
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self.max_zip_uncompressed_bytes = max_zip_uncompressed_bytes
        self.max_zip_ratio = max_zip_ratio
        self._lock = threading.Lock()
        self._sweep()

    def _sweep(self) -> None:
        """Remove partial files a crash left behind (a kill mid-upload)."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                for stale in folder.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)

    def folder(self, product: str) -> Path:
        return self.root / product

    # ---------------------------------------------------------------- reading
    def list(self, product: str) -> builtins.list[StagedImage]:
        folder = self.folder(product)
        if not folder.is_dir():
            return []
        return [StagedImage(p.name, p.stat().st_size, p) for p in sorted(folder.iterdir())
                if p.is_file() and not p.is_symlink() and p.suffix.lower() in IMAGE_SUFFIXES]

    def paths(self, product: str) -> builtins.list[Path]:
        images = [s.path for s in self.list(product)]
        if not images:
            raise NoNominalImages(f"no nominal images staged for {product!r}; upload some first")
        return images

    # ---------------------------------------------------------------- writing
    def add(self, product: str, files: builtins.list[UploadedFile]) -> builtins.list[StagedImage]:
        """Validate every upload (zips expanded), then store them all. Returns what was added."""
        images: builtins.list[tuple[str, bytes]] = []
        for upload in files:
            if self.is_zip(upload):
                images.extend(self._expand_zip(upload))
            else:
                images.append((upload.filename, upload.data))
        if not images:
            raise InvalidUpload("no images in the upload")
        validated = [(self._validate(name, data), data) for name, data in images]
        with self._lock:
            existing = {s.name for s in self.list(product)}
            new = {}
            for suffix, data in validated:
                name = hashlib.sha256(data).hexdigest()[:32] + suffix
                if name not in existing:
                    new[name] = data
            if len(existing) + len(new) > self.max_images:
                raise TooManyImages(
                    f"staging set would hold {len(existing) + len(new)} images, "
                    f"more than the limit of {self.max_images}")
            folder = self.folder(product)
            added: builtins.list[StagedImage] = []
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for name, data in new.items():
                    target = folder / name
                    temp = folder / f".{name}.{os.getpid()}.tmp"
                    try:
                        temp.write_bytes(data)
                        os.replace(temp, target)
                    finally:
                        temp.unlink(missing_ok=True)
                    added.append(StagedImage(name, len(data), target))
            except OSError:
                # All or nothing: a full disk leaves neither partial files nor half an upload.
                for image in added:
                    image.path.unlink(missing_ok=True)
                raise
        return added

    def clear(self, product: str) -> int:
        with self._lock:
            folder = self.folder(product)
            if not folder.is_dir():
                return 0
            count = len(self.list(product))
            shutil.rmtree(folder)
            return count

    # ---------------------------------------------------------------- validation
    def _validate(self, name: str, data: bytes) -> str:
        try:
            decode_image(data, max_pixels=self.max_image_pixels)
        except ImageTooLarge as exc:
            raise ImageTooLarge(f"{name}: {exc}") from exc
        except InvalidImage as exc:
            raise InvalidUpload(f"{name} is not a readable image: {exc}") from exc
        return _image_suffix(data)

    @staticmethod
    def is_zip(upload: UploadedFile) -> bool:
        if upload.content_type and upload.content_type.split(";")[0].strip() in ZIP_TYPES:
            return True
        return upload.filename.lower().endswith(".zip") or upload.data[:4] == b"PK\x03\x04"

    def _expand_zip(self, upload: UploadedFile) -> builtins.list[tuple[str, bytes]]:
        try:
            archive = zipfile.ZipFile(io.BytesIO(upload.data))
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InvalidUpload(f"{upload.filename} is not a readable zip archive: {exc}") from exc
        out: builtins.list[tuple[str, bytes]] = []
        total = 0
        with archive:
            members = archive.infolist()
            if len(members) > self.max_images * 2:
                raise TooManyImages(f"zip holds {len(members)} entries, too many")
            for info in members:
                name = info.filename
                self._check_member_name(name)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise InvalidUpload(f"zip member {name!r} is a symbolic link")
                if info.is_dir() or name.startswith(_SKIPPED_ZIP_PREFIXES) or \
                        PurePosixPath(name).name.startswith("."):
                    continue
                if mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
                    raise InvalidUpload(f"zip member {name!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise InvalidUpload(f"zip member {name!r} is encrypted")
                total += info.file_size
                if total > self.max_zip_uncompressed_bytes:
                    raise PayloadTooLarge("zip expands beyond the size limit (zip bomb guard)")
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > self.max_zip_ratio:
                    raise InvalidUpload(
                        f"zip member {name!r} is compressed {ratio:.0f}x, more than the limit "
                        f"of {self.max_zip_ratio:g}x (zip bomb guard)")
                out.append((name, self._read_member(archive, info)))
        return out

    def _read_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        # Never trust the declared size: read at most one byte more than it.
        try:
            with archive.open(info) as member:
                data = member.read(info.file_size + 1)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - zlib.error, LZMAError, EOFError, ...: the client's archive
            raise InvalidUpload(f"zip member {info.filename!r} cannot be read: {exc}") from exc
        if len(data) > info.file_size:
            raise InvalidUpload(f"zip member {info.filename!r} is larger than its header says")
        return data

    @staticmethod
    def _check_member_name(name: str) -> None:
        path = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or \
                (len(name) > 1 and name[1] == ":"):
            raise InvalidUpload(f"zip member {name!r} has an unsafe path (path traversal)")
