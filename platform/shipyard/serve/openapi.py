"""The serving API as an OpenAPI 3.1 document, built from the pydantic models that validate
its request bodies, so the two cannot disagree. Served at /openapi.json: what clients generate
code from, and what `benchmarks/chaos.py` fuzzes the server with (schemathesis)."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from shipyard.serve.protocol import ERROR_TYPES, ChatBody, CompletionBody

SCHEMAS = "#/components/schemas/{model}"
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openapi_document(title: str) -> dict[str, Any]:
    """Every route, its body's schema, and its answers (OpenAI's error shape for each status)."""
    _, definitions = models_json_schema(
        [(CompletionBody, "validation"), (ChatBody, "validation")], ref_template=SCHEMAS
    )
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {
        "/v1/completions": {"post": _generation("createCompletion", CompletionBody)},
        "/v1/chat/completions": {"post": _generation("createChatCompletion", ChatBody)},
        "/v1/models": {"get": _operation("listModels", {200: "the served model"}, secured=True)},
        "/v1/models/{model}": {
            "get": {
                **_operation("retrieveModel", {200: "the model", 404: "no such model"}, True),
                "parameters": [model],
            }
        },
        "/v1/health": {"get": _operation("health", {200: "the replica works"}, secured=False)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {
            "schemas": {**definitions["$defs"], "Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _generation(operation_id: str, body: type) -> dict[str, Any]:
    answers = {
        200: "the answer, or with `stream` its server-sent events",
        400: "a bad body",
        404: "another model",
        413: "a body over serve.max_request_bytes",
        429: "the replica's queue is full",
        503: "the model is broken",
        504: "past serve.request_timeout_s",
    }
    reference = {"$ref": SCHEMAS.format(model=body.__name__)}
    return {
        **_operation(operation_id, answers, secured=True),
        "requestBody": {"required": True, "content": {"application/json": {"schema": reference}}},
    }


def _operation(operation_id: str, answers: dict[int, str], secured: bool) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": SCHEMAS.format(model="Error")}}}
    responses: dict[str, Any] = {
        str(status): {"description": text, **({"content": error} if status in ERROR_TYPES else {})}
        for status, text in answers.items()
    }
    if secured:
        responses["401"] = {"description": "a key is required (serve.api_keys_env)"}
    return {
        "operationId": operation_id,
        "responses": responses,
        **({"security": [{}, {"bearer": []}]} if secured else {}),
    }
