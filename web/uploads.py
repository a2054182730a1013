"""Multipart parsing for uploads: file parts bounded by the upload limit only, text kept small.

Werkzeug's multipart decoder checks ``bytes it holds + the chunk just read`` against
``MAX_FORM_MEMORY_SIZE`` in every state, file data included, and reads 64 KiB chunks. With a
limit of 64 KiB, any bytes it kept back from the previous chunk (a CR or LF near the chunk's end
could start the boundary) pushed that sum over the limit, so most uploads over ~300 KB were
refused as too large (pallets/werkzeug#3003 is the same family of report). Here the parser reads
chunks of a quarter of the form limit: while it streams a file part it holds at most one chunk
plus a boundary (at most 70 bytes by RFC 2046, longer ones are refused), so a file part can never
reach the limit whatever its bytes, while part headers and text fields still stay under it.

:func:`too_large_message` says which limit a refused request actually exceeded. The boundary is
searched for without compiling an expression per request (:mod:`web.multipart`).
"""

from __future__ import annotations

import typing as t

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser

from web.multipart import MULTIPART_PARSE

__all__ = [
    "FORM_MEMORY_BYTES",
    "FORM_MAX_PARTS",
    "FormTooLarge",
    "UploadRequest",
    "too_large_message",
]

FORM_MEMORY_BYTES = 64 * 1024
"""Most bytes of part headers and text fields that one form may hold in memory."""

FORM_MAX_PARTS = 64
"""Most parts (files and fields) in one multipart form: the upload form sends a handful."""

# RFC 2046, section 5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY_BYTES = 70


class FormTooLarge(RequestEntityTooLarge):
    """The form's text fields or part headers exceed their in-memory limit, or it has too many
    parts; file contents are never counted here."""

    description = (
        f"the form's text fields and part headers exceed {FORM_MEMORY_BYTES // 1024} KiB, or it "
        f"has more than {FORM_MAX_PARTS} parts (file contents do not count towards either limit)"
    )


class UploadMultiPartParser(MultiPartParser):
    """Werkzeug's multipart parser with a decoder that compiles nothing per request
    (:mod:`web.multipart`)."""

    parse = MULTIPART_PARSE


class UploadFormDataParser(FormDataParser):
    """Werkzeug's form parser with a chunk size that keeps file data clear of the text limit."""

    def _parse_multipart(
        self,
        stream: t.IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str],
    ) -> tuple[t.IO[bytes], t.Any, t.Any]:
        limit = self.max_form_memory_size
        parser = UploadMultiPartParser(
            stream_factory=self.stream_factory,
            max_form_memory_size=limit,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
            # A quarter of the limit: what the decoder holds while streaming a file part (one
            # chunk plus a boundary) then stays far below the limit it checks on every chunk.
            buffer_size=max(1024, limit // 4) if limit else 64 * 1024,
        )
        boundary = options.get("boundary", "").encode("ascii", "replace")
        if not boundary or len(boundary) > MAX_BOUNDARY_BYTES:
            raise ValueError(f"the multipart boundary must be 1 to {MAX_BOUNDARY_BYTES} bytes")
        try:
            form, files = parser.parse(stream, boundary, content_length)
        except FormTooLarge:
            raise
        except RequestEntityTooLarge as exc:
            # The body itself is bounded by MAX_CONTENT_LENGTH before and while it is read; a
            # refusal from inside the parser of a body within that bound is the form's own limit.
            if self.max_content_length is None or (content_length or 0) <= self.max_content_length:
                raise FormTooLarge() from exc
            raise
        return stream, form, files


class UploadRequest(Request):
    """Flask's request with :class:`UploadFormDataParser`."""

    form_data_parser_class = UploadFormDataParser


def too_large_message(
    exc: RequestEntityTooLarge, content_length: int | None, limit_mb: float
) -> str:
    """Say which limit a 413 was for: the form's text limit, or the upload size limit."""
    if isinstance(exc, FormTooLarge):
        return str(exc.description)
    limit_bytes = int(limit_mb * 1024 * 1024)
    limit = f"the {limit_mb:g} MiB limit ({limit_bytes:,} bytes, CXR_MAX_UPLOAD_MB)"
    if content_length:
        size = content_length / (1024 * 1024)
        return f"the request is {size:.2f} MiB ({content_length:,} bytes), above {limit}"
    return f"the request body grew past {limit}"
