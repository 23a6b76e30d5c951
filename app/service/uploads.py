"""Reading images out of a request: multipart files, or one raw body."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.service.errors import ClientGone, EmptyBody, InvalidUpload, TooManyImages, UnsupportedMediaType
from app.service.staging import ZIP_TYPES, UploadedFile

RAW_IMAGE_TYPES = ("application/octet-stream",)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_uploads(request: Request, max_files: int, *,
                       raw_types: tuple[str, ...] = RAW_IMAGE_TYPES,
                       allow_zip: bool = False) -> list[UploadedFile]:
    """Files from a multipart form, or the whole body for image/* (and `raw_types`).

    Raises EmptyBody, UnsupportedMediaType (415), TooManyImages (413), ClientGone (499).
    """
    try:
        return await _read_uploads(request, max_files, raw_types, allow_zip)
    except ClientDisconnect:  # hung up mid-upload: the client's doing (499), not a server error
        raise ClientGone("the client disconnected while sending its images") from None


async def _read_uploads(request: Request, max_files: int, raw_types: tuple[str, ...],
                        allow_zip: bool) -> list[UploadedFile]:
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _read_multipart(request, max_files)
    accepted = kind.startswith("image/") or kind in raw_types or (allow_zip and kind in ZIP_TYPES)
    if not accepted:
        body = await request.body()
        if not body:
            raise EmptyBody("the request body is empty: send an image")
        expected = "multipart/form-data or image/*" + (" or application/zip" if allow_zip else "")
        raise UnsupportedMediaType(f"unsupported content type {kind or '(none)'!r}: "
                                   f"expected {expected}")
    body = await request.body()
    if not body:
        raise EmptyBody("the request body is empty: send an image")
    name = request.headers.get("x-filename") or ("upload.zip" if kind in ZIP_TYPES else None)
    return [UploadedFile(name or "image", body, kind)]


async def _read_multipart(request: Request, max_files: int) -> list[UploadedFile]:
    try:
        form = await request.form(max_files=max_files + 1, max_fields=100)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise TooManyImages(f"more than {max_files} files in one request") from exc
        raise InvalidUpload(f"malformed multipart body: {exc.detail}") from exc
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if len(files) > max_files:
            raise TooManyImages(f"{len(files)} files in one request; the limit is {max_files}")
        out = []
        for index, upload in enumerate(files):
            data = await upload.read()
            if not data:
                raise EmptyBody(f"file {index} ({upload.filename}) is empty")
            out.append(UploadedFile(upload.filename or f"file{index}", data, upload.content_type))
    finally:
        await form.close()
    if not out:
        raise EmptyBody("the multipart body holds no files")
    return out
