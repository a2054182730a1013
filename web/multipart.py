"""Werkzeug's multipart decoder without two regular expressions compiled per request.

Werkzeug's ``MultipartDecoder`` (3.1.9, the latest release) compiles two regular expressions
that embed the request's boundary, in its ``__init__``: one to find the boundary after the
preamble, one to find it after each part. Every client sends a fresh random boundary, so
:mod:`re`'s cache never hits and each upload pays for both compiles: ~0.26 ms of CPU, the largest
single item of the web's work per upload once the image is decoded and stored
(``python -m bench.submit --profile``). A ``functools.lru_cache`` of the compile would not help
for the same reason: no two requests share a boundary.

:class:`BoundaryDecoder` is that decoder with those two searches done without compiling: find the
boundary's bytes (``--`` + boundary) with ``bytes.find``, check the line break before them, and
match what follows with one expression compiled once at import. The matches are the very ones
Werkzeug's expressions give (same start, end and group; ``tests/web/test_multipart.py`` compares
them on random buffers and whole bodies). :data:`MULTIPART_PARSE` is Werkzeug's own
``MultiPartParser.parse`` with the one name it builds its decoder from bound to
:class:`BoundaryDecoder`: the parsing loop stays Werkzeug's, upgrades included. Should a Werkzeug
version build its decoder differently, it is Werkzeug's parse unchanged (only slower) and a test
says so.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

from werkzeug.formparser import MultiPartParser
from werkzeug.sansio.multipart import MultipartDecoder

__all__ = ["FAST_PARSE", "MULTIPART_PARSE", "BoundaryDecoder", "BoundarySearch"]

# What Werkzeug's expressions accept after "--" + boundary: "--" (the last boundary) with
# optional horizontal whitespace and line break, or optional whitespace and a line break.
_LINE_BREAK = rb"(?:\r\n|\n|\r)"
_AFTER_BOUNDARY = re.compile(rb"--[^\S\n\r]*%s?|[^\S\n\r]*%s" % (_LINE_BREAK, _LINE_BREAK))


class BoundaryMatch:
    """The part of :class:`re.Match` that ``MultipartDecoder`` reads: start, end, group 1."""

    __slots__ = ("_end", "_start", "_suffix", "_text")

    def __init__(self, text: bytes, start: int, suffix: bytes, end: int) -> None:
        self._text, self._start, self._suffix, self._end = text, start, suffix, end

    def start(self) -> int:
        """Where the match starts (its leading line break, if any)."""
        return self._start

    def end(self) -> int:
        """Where the match ends (after the line break that follows the boundary)."""
        return self._end

    def group(self, index: int = 0) -> bytes:
        """0: the whole match; 1: what follows the boundary (``--`` for the last one)."""
        if index == 1:
            return self._suffix
        if index == 0:
            return self._text
        raise IndexError("no such group")


class BoundarySearch:
    """Searches like Werkzeug's compiled ``(LB)?--boundary(...)`` (``preamble_re``) or
    ``(LB)--boundary(...)`` (``boundary_re``), without compiling anything per boundary."""

    def __init__(self, boundary: bytes, *, line_break_required: bool) -> None:
        self.marker = b"--" + boundary
        self.line_break_required = line_break_required

    def search(self, data: bytes | bytearray, pos: int = 0) -> BoundaryMatch | None:
        """The leftmost match in ``data`` starting at ``pos`` or later, else ``None``."""
        found = data.find(self.marker, pos)
        while found != -1:
            start = self._start(data, found, pos)
            if start is not None:
                after = _AFTER_BOUNDARY.match(data, found + len(self.marker))
                if after is not None:
                    end = after.end()
                    return BoundaryMatch(bytes(data[start:end]), start, after.group(), end)
            # No match here: a later occurrence's match can only start later (it begins at
            # most two bytes, a line break, before that occurrence's "--", and those bytes
            # cannot be this occurrence's "--").
            found = data.find(self.marker, found + 1)
        return None

    def _start(self, data: bytes | bytearray, found: int, pos: int) -> int | None:
        # The expression's line break before "--": CRLF, else a lone LF or CR, taken when it is
        # there (the search is leftmost); none only where it is optional.
        if found - 2 >= pos and data[found - 2 : found] == b"\r\n":
            return found - 2
        if found - 1 >= pos and data[found - 1] in b"\r\n":
            return found - 1
        return None if self.line_break_required else found


class BoundaryDecoder(MultipartDecoder):
    """Werkzeug's ``MultipartDecoder`` with :class:`BoundarySearch` for its two expressions."""

    def __init__(
        self,
        boundary: bytes,
        max_form_memory_size: int | None = None,
        *,
        max_parts: int | None = None,
    ) -> None:
        # Set up every attribute as Werkzeug does, on a fixed boundary whose two expressions
        # re's cache holds after the first request, then search for the real one without them.
        super().__init__(b"-", max_form_memory_size, max_parts=max_parts)
        self.boundary = boundary
        self.preamble_re = BoundarySearch(boundary, line_break_required=False)  # type: ignore[assignment]
        self.boundary_re = BoundarySearch(boundary, line_break_required=True)  # type: ignore[assignment]


def _parse_with_decoder(decoder: type[MultipartDecoder]) -> Callable[..., Any] | None:
    """``MultiPartParser.parse`` building ``decoder``; ``None`` if it is not built by that name.

    Werkzeug's parse has no hook for its decoder class: it calls the module-level name
    ``MultipartDecoder``. The same code with that one name bound otherwise is that hook, without
    changing ``werkzeug.formparser`` for anyone else in the process.
    """
    parse = MultiPartParser.parse
    code = parse.__code__
    if "MultipartDecoder" not in code.co_names or code.co_freevars:
        return None
    scope = {**parse.__globals__, "MultipartDecoder": decoder}
    fast = types.FunctionType(code, scope, parse.__name__, parse.__defaults__)
    fast.__kwdefaults__ = parse.__kwdefaults__
    fast.__doc__, fast.__qualname__ = parse.__doc__, parse.__qualname__
    return fast


_FAST = _parse_with_decoder(BoundaryDecoder)
FAST_PARSE = _FAST is not None
"""Whether :data:`MULTIPART_PARSE` uses :class:`BoundaryDecoder` (True on Werkzeug 3.1.x)."""
MULTIPART_PARSE: Callable[..., Any] = _FAST or MultiPartParser.parse
"""``MultiPartParser.parse`` with :class:`BoundaryDecoder` (Werkzeug's own where that fails)."""
