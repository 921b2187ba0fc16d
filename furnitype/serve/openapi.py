"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json`` (docs/serve.md explains it in prose)."""

from __future__ import annotations

import furnitype

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_PHOTOS_FORM = {
    "type": "object",
    "properties": {"photo": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["photo"],
}
_TIMINGS = {
    "type": "object",
    "properties": {name: {"type": "number"} for name in ("decode_ms", "network_ms", "total_ms")},
}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in (401, *codes)}


def openapi() -> dict:
    """The description as a JSON-ready dict."""
    prediction = {
        "type": "object",
        "properties": {
            "filename": {"type": "string"},
            "sha256": _SHA256,
            "label": {"type": "string"},
            "probability": {"type": "number"},
            "top_k": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string"}, "probability": {"type": "number"}}}},
            "timings": _TIMINGS,
        },
    }
    neighbour = {
        "type": "object",
        "properties": {"sha256": _SHA256, "label": {"type": ["string", "null"]}, "distance": {"type": "number"},
                       "score": {"type": "number", "description": "1 - distance (cosine similarity)"}},
    }
    k = _query("k", {"type": "integer", "minimum": 1, "default": 10}, "Neighbours to return.")
    max_distance = _query("max_distance", {"type": "number", "minimum": 0, "maximum": 2},
                          "Leave out neighbours farther than this cosine distance.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "furnitype", "version": furnitype.__version__,
                 "description": "Label furniture photos and find look-alikes in a catalogue (docs/serve.md)."},
        "components": {
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}},
                                  "required": ["error"]}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only when the server was started with --token."}},
        },
        "paths": {
            "/v1/health": {"get": {"summary": "503 until the model is loaded and warm, then 200.", "responses": {
                "200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}),
                "503": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "Starting")}}},
            "/v1/info": {"get": {"summary": "The run, its model and classes, the catalogue, the settings.",
                                 "responses": {"200": _json({"type": "object"}), **_errors(503)}}},
            "/v1/predict": {"post": {
                "summary": "Label one or more photos (as furnitype predict).",
                "parameters": [_query("top_k", {"type": "integer", "minimum": 1}, "Classes per photo.")],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _PHOTOS_FORM}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "model": {"type": "string"}, "features": {"type": "string"},
                        "predictions": {"type": "array", "items": prediction}}}),
                    **_errors(400, 413, 415, 422, 503)}}},
            "/v1/similar": {"post": {
                "summary": "The catalogue's photos nearest to an uploaded photo, or to a catalogue photo by sha256.",
                "parameters": [k, max_distance],
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": _PHOTOS_FORM},
                    "application/json": {"schema": {"type": "object", "required": ["sha256"], "properties": {
                        "sha256": _SHA256, "k": {"type": "integer"}, "max_distance": {"type": "number"}}}}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "query": {"type": "object", "properties": {
                            "sha256": _SHA256, "in_catalogue": {"type": "boolean"},
                            "label": {"type": ["string", "null"]}}},
                        "neighbours": {"type": "array", "items": neighbour}, "timings": _TIMINGS}}),
                    **_errors(400, 404, 413, 415, 422, 503)}}},
            "/v1/photos/{sha256}": {"get": {
                "summary": "A JPEG thumbnail of a photo of the catalogue or the queue.",
                "parameters": [{"name": "sha256", "in": "path", "required": True, "schema": _SHA256},
                               _query("size", {"type": "integer", "minimum": 16, "maximum": 1024, "default": 256},
                                      "The thumbnail's largest side in pixels.")],
                "responses": {"200": {"description": "The thumbnail", "content": {"image/jpeg": {}}},
                              **_errors(400, 404, 503)}}},
            "/v1/suggest": {"get": {
                "summary": "The queue's photos most worth labelling (as furnitype suggest), labelled ones left out.",
                "parameters": [_query("n", {"type": "integer", "minimum": 1, "default": 10}, "Photos to suggest.")],
                "responses": {"200": _json({"type": "object", "properties": {
                    "classes": {"type": "array", "items": {"type": "string"}},
                    "photos": {"type": "array", "items": {"type": "object", "properties": {
                        "sha256": _SHA256, "predicted": {"type": "string"}, "probability": {"type": "number"},
                        "score": {"type": "number"}}}}}}), **_errors(400, 404, 503)}}},
            "/v1/labels": {"post": {
                "summary": "Append a label for a photo of the queue to the labels CSV.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["sha256", "label"],
                    "properties": {"sha256": _SHA256, "label": {"type": "string"}}}}}},
                "responses": {"201": _json({"type": "object", "properties": {
                    "sha256": _SHA256, "label": {"type": "string"}, "count": {"type": "integer"}}}, "Saved"),
                    **_errors(400, 403, 404, 415, 503)}}},
        },
        "security": [{}, {"bearer": []}],
    }
