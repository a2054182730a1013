"""The OpenAPI document: valid 3.1, complete (every /api/ route), and true of real answers."""

from __future__ import annotations

import io
from typing import Any

import jsonschema
import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from werkzeug.test import TestResponse

from tests.conftest import make_settings
from tests.web.conftest import png
from web.openapi import document, documented_rules, openapi_path

TOKEN = "openapi-test-token-0123456789"


def answer_conforms(doc: dict[str, Any], rule: str, method: str, response: TestResponse) -> None:
    """Assert ``response`` is a documented status whose JSON body matches its schema."""
    operation = doc["paths"][openapi_path(rule)][method.lower()]
    documented = operation["responses"]
    assert str(response.status_code) in documented, (rule, method, response.status_code)
    content = documented[str(response.status_code)].get("content", {})
    if "application/json" in content:
        schema = {**content["application/json"]["schema"], "components": doc["components"]}
        jsonschema.validate(response.get_json(), schema, cls=jsonschema.Draft202012Validator)
    else:
        assert response.mimetype in content, (rule, response.mimetype)
    response.close()


def test_the_document_is_valid_openapi_3_1(client: FlaskClient) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_api_route_is_documented(app: Flask) -> None:
    doc = document(app)
    rules = [(r, m) for r, m, _ in documented_rules(app)]
    assert len(rules) >= 15
    for rule, method in rules:
        assert method.lower() in doc["paths"][openapi_path(rule)], (method, rule)
    # Not only the documented ones: every route of the url_map under /api/.
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
                assert method.lower() in doc["paths"][openapi_path(rule.rule)]


def test_a_route_without_a_declaration_is_refused(app: Flask) -> None:
    app.add_url_rule("/api/v1/undeclared", "undeclared", lambda: jsonify({}))
    with pytest.raises(LookupError, match="undeclared"):
        document(app)


def test_admin_routes_need_the_bearer_token_and_say_so(app: Flask) -> None:
    doc = document(app)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for operation in item.values():
            admin = path.startswith("/api/v1/admin")
            assert ("security" in operation) == admin, path
            if admin:
                assert {"401", "403", "413"} <= set(operation["responses"]), path
    upload = doc["paths"]["/api/v1/predictions"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"202", "400", "413", "415", "429", "503"} <= set(upload["responses"])


def test_a_result_field_follows_the_dataclass(app: Flask) -> None:
    from dataclasses import fields

    from worker.records import PredictionResult

    schema = document(app)["components"]["schemas"]["PredictionResult"]
    assert set(schema["properties"]) == {f.name for f in fields(PredictionResult)}


def test_the_docs_page_is_served_without_a_cdn(client: FlaskClient) -> None:
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/api/v1/openapi.json" in html and "api_docs.js" in html
    assert "http" not in html.split("<main>")[1].split("</main>")[0].replace("http-equiv", "")
    script = client.get("/static/api_docs.js")
    assert script.status_code == 200
    script.close()


def test_real_answers_match_the_document(live_app: Flask, tmp_path: Any) -> None:
    doc = document(live_app)
    client = live_app.test_client()
    accepted = client.post("/api/v1/predictions", data={"file": (io.BytesIO(png()), "x.png")})
    answer_conforms(doc, "/api/v1/predictions", "POST", accepted)
    done = client.get(f"{accepted.get_json()['status_url']}?wait=20")
    assert done.get_json()["status"] == "done"
    answer_conforms(doc, "/api/v1/predictions/<job_id>", "GET", done)
    answer_conforms(doc, "/api/v1/predictions/<job_id>", "GET", client.get("/api/v1/predictions/x"))
    answer_conforms(doc, "/api/v1/predictions", "POST", client.post("/api/v1/predictions"))
    answer_conforms(doc, "/readyz", "GET", client.get("/readyz"))
    answer_conforms(doc, "/healthz", "GET", client.get("/healthz"))


def test_admin_answers_match_the_document(redis_url: str, model_dir: Any, tmp_path: Any) -> None:
    from web import create_app

    data = tmp_path / "data"
    data.mkdir()
    settings = make_settings(redis_url, model_dir, admin_token=TOKEN, data_dir=data)
    app = create_app({"TESTING": True, "CXR_SETTINGS": settings})
    doc = document(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = "/api/v1/admin"
    job = client.post(f"{base}/training-jobs", json={"epochs_head": 1}, headers=auth)
    answer_conforms(doc, f"{base}/training-jobs", "POST", job)
    for body in ({"dataset": "missing"}, {"input_size": 1}):
        refused = client.post(f"{base}/training-jobs", json=body, headers=auth)
        answer_conforms(doc, f"{base}/training-jobs", "POST", refused)
    job_id = job.get_json()["id"]
    answer_conforms(
        doc, f"{base}/training-jobs", "GET", client.get(f"{base}/training-jobs", headers=auth)
    )
    rule = f"{base}/training-jobs/<job_id>"
    answer_conforms(doc, rule, "GET", client.get(f"{base}/training-jobs/{job_id}", headers=auth))
    answer_conforms(
        doc, rule, "DELETE", client.delete(f"{base}/training-jobs/{job_id}", headers=auth)
    )
    answer_conforms(
        doc, rule, "DELETE", client.delete(f"{base}/training-jobs/{job_id}", headers=auth)
    )
    answer_conforms(doc, f"{base}/models", "GET", client.get(f"{base}/models", headers=auth))
    for version in (1, 2, 9):
        got = client.get(f"{base}/models/{version}", headers=auth)
        answer_conforms(doc, f"{base}/models/<int:version>", "GET", got)
        curves = client.get(f"{base}/models/{version}/curves.png", headers=auth)
        answer_conforms(doc, f"{base}/models/<int:version>/curves.png", "GET", curves)
    promoted = client.post(f"{base}/models/2/promote", json={"reason": "r"}, headers=auth)
    answer_conforms(doc, f"{base}/models/<int:version>/promote", "POST", promoted)
    answer_conforms(
        doc, f"{base}/models/rollback", "POST", client.post(f"{base}/models/rollback", headers=auth)
    )
    answer_conforms(doc, f"{base}/audit", "GET", client.get(f"{base}/audit", headers=auth))
    answer_conforms(doc, f"{base}/audit", "GET", client.get(f"{base}/audit"))
