"""The API's contract: each view declares its operation once; the OpenAPI 3.1 document follows.

A view is marked with :func:`declare` (what it takes: path parameters come from its Flask rule, a
query model, a JSON or multipart body; what it answers: a model per status code). Schemas are
never written here: pydantic produces them from the models that parse requests
(``TrainingRequest``, ``web.schemas``) and the records that shape answers (the dataclasses of
``worker.records``, ``worker.registry``, ``ml.versions``), so a new field in one of them is in
the document at once. What every operation of a kind shares is added here, not declared again:
the admin routes' bearer token and 401/403/413, the 429 of rate-limited endpoints, the 503 of a
Redis outage.

:func:`document` walks ``app.url_map``: a route under ``/api/`` without a declaration raises, so it
cannot be served undocumented (and a test builds the document). The blueprint serves it at
``/api/v1/openapi.json`` and a self-contained page at ``/api/v1/docs`` (no CDN, no UI package).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template
from pydantic import BaseModel, TypeAdapter

from web.schemas import ErrorDocument

__all__ = ["Operation", "Reply", "declare", "document", "operation_of"]

F = TypeVar("F", bound=Callable[..., Any])
ATTRIBUTE = "__cxr_operation__"
ADMIN_PREFIX = "/api/v1/admin"
COMPONENT_REF = "#/components/schemas/{model}"

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")


@dataclass(frozen=True)
class Reply:
    """One answer of an operation: its description, body model and headers.

    ``model`` is anything pydantic can describe (a dataclass, a ``TypedDict``, a model); ``None``
    with a status >= 400 means the JSON error document; a dict is a JSON schema used as is.
    ``media_type`` other than JSON is a binary body (e.g. ``image/png``).
    """

    description: str
    model: Any = None
    media_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    also: tuple[str, ...] = ()  # other media types of the same answer, as text (e.g. Markdown)


@dataclass(frozen=True)
class Operation:
    """What one view takes and answers (its summary is its docstring's first line)."""

    responses: Mapping[int, Reply | str]
    body: type[BaseModel] | None = None
    body_kind: Literal["json", "multipart"] = "json"
    body_required: bool = False
    query: type[BaseModel] | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)  # path parameter -> description
    tag: str = "predictions"
    redis: bool = True  # touches Redis: a 503 when it is unreachable
    rate_limited: bool = False


def declare(operation: Operation) -> Callable[[F], F]:
    """Attach ``operation`` to a view (kept by ``functools.wraps``, e.g. the rate limiter's)."""

    def mark(view: F) -> F:
        setattr(view, ATTRIBUTE, operation)
        return view

    return mark


def operation_of(view: Callable[..., Any]) -> Operation | None:
    """The declaration of a view, through any wrappers."""
    found = getattr(view, ATTRIBUTE, None)
    if found is None and hasattr(view, "__wrapped__"):
        return operation_of(view.__wrapped__)
    return found if isinstance(found, Operation) else None


# --- the parts every operation of a kind shares -----------------------------------------------

RETRY_AFTER = "Seconds after which to try again."
ADMIN_REPLIES: dict[int, Reply | str] = {
    401: Reply(
        "Missing or wrong bearer token (`unauthorized`).",
        headers={"WWW-Authenticate": "`Bearer`."},
    ),
    403: "The admin API is disabled: no `CXR_ADMIN_TOKEN` is configured (`admin_disabled`).",
    413: "The request body is over 64 KiB (`too_large`).",
}
RATE_LIMITED = Reply(
    "Too many requests from this client address (`too_many_requests`).",
    headers={"Retry-After": RETRY_AFTER},
)
REDIS_DOWN = "Redis is unreachable (`unavailable`); try again shortly."


def _converter_schema(converter: str) -> dict[str, Any]:
    if converter == "int":
        return {"type": "integer", "minimum": 0}
    return {"type": "string", "pattern": "^[^/]+$"}


_RULE_PART = re.compile(r"<(?:(?P<converter>[a-z]+)(?:\([^)]*\))?:)?(?P<name>\w+)>")


class _Schemas:
    """Collects component schemas: one name per model, ``$defs`` hoisted."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: Any, mode: Literal["validation", "serialization"]) -> dict[str, Any]:
        if isinstance(model, dict):  # a schema given as is
            return model
        schema = TypeAdapter(model).json_schema(ref_template=COMPONENT_REF, mode=mode)
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        name = str(schema.get("title") or getattr(model, "__name__", "Body"))
        self.components.setdefault(name, schema)
        return {"$ref": COMPONENT_REF.format(model=name)}


def _response(schemas: _Schemas, status: int, reply: Reply | str) -> dict[str, Any]:
    if isinstance(reply, str):
        reply = Reply(reply)
    out: dict[str, Any] = {"description": reply.description}
    model = reply.model if reply.model is not None or status < 400 else ErrorDocument
    if model is not None:
        out["content"] = {reply.media_type: {"schema": schemas.ref(model, "serialization")}}
    elif reply.media_type != "application/json":
        binary = {"type": "string", "contentMediaType": reply.media_type}
        out["content"] = {reply.media_type: {"schema": binary}}
    for media_type in reply.also:
        out.setdefault("content", {})[media_type] = {"schema": {"type": "string"}}
    if reply.headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in reply.headers.items()
        }
    return out


def _operation(
    schemas: _Schemas, rule: str, endpoint: str, op: Operation, view: Callable[..., Any]
) -> dict[str, Any]:
    path = openapi_path(rule)
    doc = inspect.getdoc(inspect.unwrap(view)) or endpoint
    summary, _, description = doc.partition("\n")
    out: dict[str, Any] = {
        "operationId": endpoint.replace(".", "_"),
        "summary": summary.strip(),
        "tags": ["admin" if path.startswith(ADMIN_PREFIX) else op.tag],
    }
    if description.strip():
        out["description"] = description.strip()
    parameters = []
    for match in _RULE_PART.finditer(rule):
        name = match["name"]
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": op.parameters.get(name, name),
                "schema": _converter_schema(match["converter"] or "default"),
            }
        )
    if op.query is not None:
        for name, info in op.query.model_fields.items():
            schema = op.query.model_json_schema()["properties"][name]
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": info.is_required(),
                    "description": info.description or name,
                    "schema": {k: v for k, v in schema.items() if k != "description"},
                }
            )
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        if op.body_kind == "multipart":
            content = {"multipart/form-data": {"schema": schemas.ref(op.body, "validation")}}
        else:
            content = {"application/json": {"schema": schemas.ref(op.body, "validation")}}
        out["requestBody"] = {"required": op.body_required, "content": content}
    replies: dict[int, Reply | str] = dict(op.responses)
    if path.startswith(ADMIN_PREFIX):
        out["security"] = [{"bearer": []}]
        replies = {**ADMIN_REPLIES, **replies}
    if op.rate_limited:
        replies.setdefault(429, RATE_LIMITED)
    if op.redis:
        replies.setdefault(503, REDIS_DOWN)
    out["responses"] = {
        str(status): _response(schemas, status, replies[status]) for status in sorted(replies)
    }
    return out


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/models/<int:version>`` → ``/models/{version}``."""
    return _RULE_PART.sub(lambda m: "{" + m["name"] + "}", rule)


def documented_rules(app: Flask) -> list[tuple[str, str, str]]:
    """``(rule, method, endpoint)`` of every route the document covers: ``/api/``, health."""
    rows = []
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/readyz")):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            rows.append((rule.rule, method, rule.endpoint))
    return sorted(rows)


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s API.

    Raises:
        LookupError: a route under ``/api/`` (or a health route) has no declaration.
    """
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for rule, method, endpoint in documented_rules(app):
        view = app.view_functions[endpoint]
        op = operation_of(view)
        if op is None:
            raise LookupError(
                f"{method} {rule} ({endpoint}) has no OpenAPI declaration: mark the view with "
                "@web.openapi.declare(Operation(...))"
            )
        paths.setdefault(openapi_path(rule), {})[method.lower()] = _operation(
            schemas, rule, endpoint, op, view
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cxr",
            "version": "1",
            "summary": "Chest X-ray classification: uploads, results, fine-tuning and versions.",
            "description": "Every error is the JSON error document `ErrorDocument`. The admin "
            "routes need `Authorization: Bearer <CXR_ADMIN_TOKEN>`.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token, CXR_ADMIN_TOKEN.",
                }
            },
        },
        "tags": [
            {"name": "predictions", "description": "Submit an X-ray, read its result."},
            {"name": "health", "description": "Liveness and readiness."},
            {"name": "docs", "description": "This document and its page."},
            {"name": "admin", "description": "Fine-tuning jobs, versions, the active pointer."},
        ],
    }


def cached_document() -> dict[str, Any]:
    """The current app's document, built on first use (it depends on the code alone)."""
    found = current_app.extensions.get("cxr_openapi")
    if found is None:
        found = current_app.extensions["cxr_openapi"] = document(current_app)
    return found


DOCS = Operation(
    responses={200: Reply("The OpenAPI 3.1 document of this API.", model={"type": "object"})},
    tag="docs",
    redis=False,
)


@bp.get("/openapi.json")
@declare(DOCS)
def openapi_json() -> Response:
    """This API's OpenAPI 3.1 document."""
    return jsonify(cached_document())


@bp.get("/docs")
@declare(
    Operation(
        responses={200: Reply("An HTML page.", media_type="text/html")}, tag="docs", redis=False
    )
)
def docs_page() -> str:
    """The document as a browsable page (rendered in the browser from openapi.json)."""
    return render_template("api_docs.html")
