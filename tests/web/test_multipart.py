"""web.multipart's boundary search gives exactly what Werkzeug's compiled expressions give."""

from __future__ import annotations

import io
import random
import uuid

import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.formparser import MultiPartParser
from werkzeug.sansio.multipart import MultipartDecoder
from werkzeug.test import encode_multipart

from web.multipart import FAST_PARSE, BoundaryDecoder, BoundarySearch
from web.uploads import UploadMultiPartParser

BOUNDARIES = [
    b"x",
    b"-",
    b"--",
    b"a-b",
    uuid.uuid4().hex.encode(),
    b"----WebKitFormBoundary7MA4YWxkTrZu0gW",
    b"a.b*c+?(d)[e]|f\\",  # characters that are special in an expression
]


def pieces(boundary: bytes) -> list[bytes]:
    """What random buffers are made of: line breaks, dashes, blanks, text and the boundary."""
    marker = b"--" + boundary
    return [b"\r", b"\n", b"\r\n", b"-", b"--", b" ", b"\t", b"z", marker, marker, marker + b"--"]


def as_tuple(match: object) -> tuple[int, int, bytes, bytes] | None:
    """A match as (start, end, group 0, group 1), comparable across re.Match and ours."""
    if match is None:
        return None
    return (match.start(), match.end(), match.group(0), match.group(1))  # type: ignore[attr-defined]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_search_matches_werkzeugs_expressions_on_random_buffers(boundary: bytes) -> None:
    stock = MultipartDecoder(boundary)
    preamble = BoundarySearch(boundary, line_break_required=False)
    between = BoundarySearch(boundary, line_break_required=True)
    rng = random.Random(boundary)
    parts = pieces(boundary)
    found = 0
    for _ in range(3000):
        data = bytearray(b"".join(rng.choice(parts) for _ in range(rng.randint(0, 12))))
        pos = rng.randint(0, len(data))
        expected = as_tuple(stock.preamble_re.search(data, pos))
        assert as_tuple(preamble.search(data, pos)) == expected, (data, pos)
        assert as_tuple(between.search(data)) == as_tuple(stock.boundary_re.search(data)), data
        found += expected is not None
    assert found > 300  # the buffers do hold boundaries, at many positions


def test_the_installed_werkzeug_gets_the_decoder_that_compiles_nothing() -> None:
    # False would mean Werkzeug builds its decoder another way now: uploads still parse
    # (Werkzeug's own parse), but each pays for two compiled expressions again.
    assert FAST_PARSE
    assert UploadMultiPartParser.parse.__globals__["MultipartDecoder"] is BoundaryDecoder
    assert MultiPartParser.parse.__globals__["MultipartDecoder"] is MultipartDecoder


def bodies() -> list[tuple[str, bytes, bytes]]:
    """Multipart bodies: Werkzeug's encoder, LF or CR only, preamble and epilogue, tricky data."""
    boundary, body = encode_multipart(
        {
            "explain": "0",
            "ood": "ignore",
            "file": FileStorage(io.BytesIO(b"\x89PNG" + bytes(range(256)) * 40), "x.png"),
        }
    )
    cases = [("werkzeug", boundary.encode(), body)]
    b = b"b0undary"
    # Near-boundaries that are data: cut short, followed by a letter or "-x", after 30 CRs.
    tricky = b"a\r\n--b0undar\r\n--b0undaryX\r--b0undary-x\n" + b"\r" * 30 + b"--b0und"
    crlf = (
        b"preamble\r\n--b0undary\r\n"
        b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b"--b0undary  \t\r\n"
        b'Content-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + tricky + b"\r\n--b0undary--\r\nepilogue"
    )
    cases += [
        ("crlf", b, crlf),
        ("lf", b, crlf.replace(b"\r\n", b"\n")),
        ("cr", b, crlf.replace(b"\r\n", b"\r")),
        ("no-leading-break", b, crlf.removeprefix(b"preamble\r\n")),
        ("empty-form", b, b"--b0undary--\r\n"),
    ]
    return cases


def parse(parser_class: type[MultiPartParser], boundary: bytes, body: bytes, size: int) -> object:
    """Fields and files (name, filename, bytes) as the parser gives them, or the error."""
    parser = parser_class(
        stream_factory=lambda **_: io.BytesIO(),  # no temporary file left open by an error
        buffer_size=size,
        max_form_memory_size=64 * 1024,
    )
    try:
        form, files = parser.parse(io.BytesIO(body), boundary, len(body))
    except ValueError as exc:
        return ("error", str(exc))
    parts = []
    for key, storage in files.items(multi=True):
        parts.append((key, storage.filename, storage.read()))
    return list(form.items(multi=True)), parts


@pytest.mark.parametrize(
    ("name", "boundary", "body"), [pytest.param(*c, id=c[0]) for c in bodies()]
)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 65536])
def test_parse_gives_what_werkzeugs_parse_gives(
    name: str, boundary: bytes, body: bytes, size: int
) -> None:
    expected = parse(MultiPartParser, boundary, body, size)
    assert parse(UploadMultiPartParser, boundary, body, size) == expected
    if size >= 64:  # (Werkzeug itself misreads some bodies in chunks of a few bytes)
        assert "error" not in expected, expected


@pytest.mark.parametrize("cut", [10, 40, -30, -5])
def test_a_truncated_body_fails_as_in_werkzeug(cut: int) -> None:
    boundary, body = bodies()[1][1:]
    expected = parse(MultiPartParser, boundary, body[:cut], 64)
    assert parse(UploadMultiPartParser, boundary, body[:cut], 64) == expected
