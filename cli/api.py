"""A small JSON client of the admin API ``/api/v1/admin`` on urllib (no HTTP library needed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["ADMIN_PATH", "AdminApi", "ApiError", "ApiUnreachable", "job_path"]

ADMIN_PATH = "/api/v1/admin"
HTTP_TIMEOUT_SECONDS = 30.0


class ApiError(Exception):
    """The admin API answered with an error document."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or []


class ApiUnreachable(Exception):
    """No answer from the admin API (refused, timed out, unknown host)."""


class AdminApi:
    """One service's admin API, called with a bearer token and an ``X-Actor`` name."""

    def __init__(self, base_url: str, token: str | None, actor: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.actor = actor

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON answer.

        Raises:
            ApiError: the API answered 4xx/5xx (the message comes from its JSON error body).
            ApiUnreachable: nothing answered at ``base_url``.
        """
        headers = {"Accept": "application/json", "User-Agent": "cxr-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.actor:
            headers["X-Actor"] = self.actor
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = self.base_url + ADMIN_PATH + path
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise error_from(exc.code, exc.read(), exc.reason) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ApiUnreachable(f"cannot reach the cxr API at {self.base_url}: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(200, f"the answer from {url} is not JSON") from None


def error_from(status: int, raw: bytes, reason: str) -> ApiError:
    """Turn an HTTP error answer into an :class:`ApiError` with the API's own message."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return ApiError(status, f"HTTP {status} {reason}")
    message = str(doc.get("message") or doc.get("error") or f"HTTP {status} {reason}")
    details = doc.get("details")
    return ApiError(status, message, details if isinstance(details, list) else [])


def job_path(job_id: str) -> str:
    """The API path of one job (the id is quoted: it comes from the command line)."""
    return "/training-jobs/" + urllib.parse.quote(job_id, safe="")
