"""Uploaded images: size and pixel limits, the content sniffed by Pillow (never the client's name or type), stored
by content under DATA/uploads, an input root of every job."""

from __future__ import annotations

import io

from graphflow.service.config import ServiceConfig
from graphflow.service.models import Upload
from graphflow.service.results import store_by_content

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


class UploadError(Exception):
    """An upload refused, with the HTTP status that says why (413 too large, 415 not an image, 422 unreadable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def store_upload(data: bytes, config: ServiceConfig) -> Upload:
    """Check an uploaded image and store it as `<sha256>.<format>`; UploadError when it is refused."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > config.upload_bytes:
        raise UploadError(413, f"the image is over the upload limit of {config.upload_bytes:,} bytes")
    if not data:
        raise UploadError(422, "the upload is empty")
    # the pixel limit is checked from the header below, before any decoding; Pillow's own bomb warning is not made
    # an error with warnings.catch_warnings, which changes the process's filters under concurrent requests
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        width, height = image.size  # from the header: checked before any pixel is decoded
        if width * height > config.upload_pixels:
            raise UploadError(413, f"the image has {width * height:,} pixels ({width} x {height}); the limit is "
                                   f"{config.upload_pixels:,}")
        image.load()
    except UnidentifiedImageError:
        raise UploadError(415, f"not an image of a known format ({', '.join(FORMATS)}), whatever its name") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UploadError(422, f"the image cannot be decoded: {error}") from None
    format_name = str(image.format)
    name = store_by_content(config.uploads, data, FORMATS[format_name])
    return Upload(name=name, path=str((config.uploads / name).resolve()), format=format_name, width=width,
                  height=height)
