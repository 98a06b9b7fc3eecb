"""The API's OpenAPI 3.1 description, served at /api/openapi.json (a test checks that every
/api route is in it and nothing else)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = {"$ref": "#/components/responses/Error"}
STAFF = [{"staffSession": []}]
CSRF = {"name": "X-CSRF-Token", "in": "header", "required": True,
        "description": "the session's CSRF token (GET /api/session)",
        "schema": {"type": "string"}}
LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}


def _path_param(name: str, kind: str = "integer") -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind}}


def _op(summary: str, ok: dict, *, params: list | None = None, body: dict | None = None,
        staff: bool = False, errors: tuple[int, ...] = (), status: str = "200") -> dict:
    op: dict = {"summary": summary, "responses": {status: ok}}
    for code in sorted({*errors, *((401,) if staff else ()), 500}):
        op["responses"][str(code)] = ERROR
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": body}
    if staff:
        op["security"] = STAFF
    return op


def _multipart(properties: dict, required: list[str]) -> dict:
    return {"multipart/form-data": {"schema": {"type": "object", "properties": properties,
                                               "required": required}}}


def _json_body(properties: dict, required: list[str]) -> dict:
    return {"application/json": {"schema": {"type": "object", "properties": properties,
                                            "required": required}}}


CSV = {"description": "CSV: sku,name,expected,counted,difference",
       "content": {"text/csv": {"schema": {"type": "string"}}}}


def openapi_document() -> dict:
    try:
        app_version = version("storyscan")
    except PackageNotFoundError:
        app_version = "0"
    sid, scan_id = _path_param("session_id"), _path_param("scan_id")
    post = [CSRF]
    paths = {
        "/api/session": {
            "get": _op("Whether this browser session is staff, and its CSRF token",
                       _json(_ref("Session"))),
            "post": _op("Staff login with the PIN (5 wrong PINs lock the client out)",
                        _json(_ref("Session")), params=post,
                        body=_json_body({"pin": {"type": "string"}}, ["pin"]),
                        errors=(401, 403, 429)),
            "delete": _op("Staff logout", _json(_ref("Session")), params=post, errors=(403,)),
        },
        "/api/catalog": {"get": _op("Catalog version, size and story languages",
                                    _json(_ref("CatalogInfo")))},
        "/api/products": {
            "get": _op("All products (without stories)",
                       _json({"type": "object", "properties": {
                           "products": {"type": "array", "items": _ref("Product")}}}),
                       params=[{"name": "category", "in": "query",
                                "schema": {"type": "string"}}]),
            "post": _op("Enrol a product from photos; recognisable when this returns",
                        _json(_ref("Enrolment"), "photos added to an existing product"),
                        params=post, staff=True, errors=(400, 403, 413, 415, 503),
                        body=_multipart({
                            "sku": {"type": "string"}, "name": {"type": "string"},
                            "category": {"type": "string"}, "price": {"type": "number"},
                            "currency": {"type": "string"},
                            "story_en": {"type": "string"}, "story_zh": {"type": "string"},
                            "photos": {"type": "array",
                                       "items": {"type": "string", "format": "binary"}}},
                            ["sku", "photos"])),
        },
        "/api/products/{sku}": {"get": _op(
            "One product with its stories", _json(_ref("Product")),
            params=[_path_param("sku", "string")], errors=(404,))},
        "/api/search": {"get": _op(
            "Full-text search over product names and stories, every language",
            _json({"type": "object", "properties": {
                "query": {"type": "string"},
                "results": {"type": "array", "items": _ref("SearchResult")}}}),
            params=[{"name": "q", "in": "query", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "lang", "in": "query", "schema": {"type": "string"}}, LIMIT],
            errors=(400,))},
        "/api/scans": {
            "get": _op("The newest scans first",
                       _json({"type": "object", "properties": {
                           "scans": {"type": "array", "items": _ref("Scan")}}}),
                       params=[LIMIT], errors=(400,)),
            "post": _op("Recognise an uploaded photo (centre crop, the kiosk's pipeline)",
                        _json(_ref("Card"), "recognised (or unknown)"), status="201",
                        params=post, errors=(400, 401, 403, 409, 413, 415, 503),
                        body=_multipart({"photo": {"type": "string", "format": "binary"},
                                         "mode": {"type": "string", "enum": ["inventory"]}},
                                        ["photo"])),
        },
        "/api/scans/{scan_id}": {"get": _op("One scan as its result card", _json(_ref("Card")),
                                            params=[scan_id], errors=(404,))},
        "/api/scans/{scan_id}/correction": {"post": _op(
            "\"Not this one?\": the product the scan really was (kept for retraining)",
            _json(_ref("Correction")), status="201", params=[scan_id, *post],
            body=_json_body({"sku": {"type": "string"}}, ["sku"]), errors=(400, 403, 404))},
        "/api/inventory/sessions": {
            "get": _op("Inventory sessions, newest first, and the open one",
                       _json({"type": "object", "properties": {
                           "open": {"oneOf": [_ref("InventorySession"), {"type": "null"}]},
                           "sessions": {"type": "array", "items": _ref("InventorySession")}}}),
                       params=[LIMIT], staff=True, errors=(400,)),
            "post": _op("Start a session: the kiosk counts every scan towards it",
                        _json(_ref("InventorySession")), status="201", params=post,
                        staff=True, body=_json_body({"name": {"type": "string"}}, ["name"]),
                        errors=(400, 403, 409)),
        },
        "/api/inventory/sessions/{session_id}": {"get": _op(
            "A session and its counts (largest discrepancy first)",
            _json({"type": "object", "properties": {
                "session": _ref("InventorySession"),
                "counts": {"type": "array", "items": _ref("Count")}}}),
            params=[sid], staff=True, errors=(404,))},
        "/api/inventory/sessions/{session_id}/counts": {"post": _op(
            "Add to (or take from) a product's count", _json({"type": "object", "properties": {
                "sku": {"type": "string"}, "counted": {"type": "integer"}}}),
            params=[sid, *post], staff=True, errors=(400, 403, 404, 409),
            body=_json_body({"sku": {"type": "string"}, "delta": {"type": "integer"}},
                            ["sku"]))},
        "/api/inventory/sessions/{session_id}/expected": {"post": _op(
            "Import expected counts (CSV sku,expected)", _json({"type": "object", "properties": {
                "imported": {"type": "integer"},
                "not_in_catalog": {"type": "array", "items": {"type": "string"}}}}),
            params=[sid, *post], staff=True, errors=(400, 403, 404, 409),
            body={"text/csv": {"schema": {"type": "string"}},
                  **_multipart({"file": {"type": "string", "format": "binary"}}, ["file"])})},
        "/api/inventory/sessions/{session_id}/export.csv": {"get": _op(
            "The session's counts as CSV", CSV, params=[sid], staff=True, errors=(404,))},
        "/api/inventory/sessions/{session_id}/close": {"post": _op(
            "Close the session; the kiosk goes back to the shopper's screen",
            _json(_ref("InventorySession")), params=[sid, *post], staff=True,
            errors=(403, 404, 409))},
        "/api/status": {"get": _op("Model, catalog, engine, speed, camera, machine, sync",
                                   _json(_ref("Status")), staff=True)},
        "/api/openapi.json": {"get": _op("This document", _json({"type": "object"}))},
    }
    paths["/api/products"]["post"]["responses"]["201"] = _json(_ref("Enrolment"),
                                                               "a new product")
    nullable_number = {"type": ["number", "null"]}
    product = {"type": "object", "required": ["sku", "name", "category"], "properties": {
        "sku": {"type": "string"}, "name": {"type": "string"}, "category": {"type": "string"},
        "price": nullable_number, "currency": {"type": "string"},
        "photo": {"type": ["string", "null"], "description": "URL of the first photo"},
        "photos": {"type": "array", "items": {"type": "string"}},
        "attributes": {"type": "array", "items": {"type": "string"}},
        "languages": {"type": "array", "items": {"type": "string"}},
        "stories": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "language code -> story (single product only)"}}}
    scan = {"type": "object", "required": ["id", "time", "unknown", "mode"], "properties": {
        "id": {"type": "integer"}, "time": {"type": "string"},
        "sku": {"type": ["string", "null"]}, "name": {"type": "string"},
        "unknown": {"type": "boolean"}, "confidence": nullable_number,
        "similarity": nullable_number, "latency_ms": nullable_number,
        "mode": {"type": "string", "enum": ["shopper", "inventory", "upload"]},
        "session": {"type": ["string", "null"]}, "source": {"type": ["string", "null"]},
        "attributes": {"type": "array", "items": {"type": "string"}},
        "alternatives": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "confidence": {"type": "number"}}}}}}
    session = {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "started": {"type": "string"},
        "closed": {"type": ["string", "null"]}, "open": {"type": "boolean"},
        "counted": {"type": "integer"}, "expected": {"type": ["integer", "null"]},
        "products": {"type": "integer"}, "discrepancies": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "storyscan kiosk API", "version": app_version,
                 "description": "The kiosk's JSON API. Errors are {\"error\": message}. "
                                "Unsafe methods need the X-CSRF-Token header; staff "
                                "endpoints need a staff session (POST /api/session)."},
        "paths": paths,
        "components": {
            "securitySchemes": {"staffSession": {"type": "apiKey", "in": "cookie",
                                                 "name": "storyscan_session"}},
            "responses": {"Error": _json({"type": "object", "required": ["error"],
                                          "properties": {"error": {"type": "string"}}},
                                         "an error, with its message")},
            "schemas": {
                "Product": product, "Scan": scan, "InventorySession": session,
                "Session": {"type": "object", "properties": {
                    "staff": {"type": "boolean"}, "csrf_token": {"type": "string"}}},
                "CatalogInfo": {"type": "object", "properties": {
                    "version": {"type": "integer"}, "products": {"type": "integer"},
                    "languages": {"type": "array", "items": {"type": "object", "properties": {
                        "code": {"type": "string"}, "label": {"type": "string"}}}}}},
                "Card": {"type": "object", "properties": {
                    "scan": _ref("Scan"),
                    "product": {"oneOf": [_ref("Product"), {"type": "null"}]},
                    "alternatives": {"type": "array", "items": _ref("Product")},
                    "counted": {"type": ["integer", "null"]}}},
                "Correction": {"type": "object", "properties": {
                    "scan_id": {"type": "integer"}, "sku": {"type": "string"},
                    "time": {"type": "string"}}},
                "SearchResult": {"allOf": [_ref("Product"), {"type": "object", "properties": {
                    "lang": {"type": ["string", "null"]}, "snippet": {"type": "string"}}}]},
                "Count": {"type": "object", "properties": {
                    "sku": {"type": "string"}, "name": {"type": "string"},
                    "counted": {"type": "integer"}, "expected": {"type": ["integer", "null"]},
                    "difference": {"type": "integer"}}},
                "Enrolment": {"type": "object", "properties": {
                    "sku": {"type": "string"}, "name": {"type": "string"},
                    "new": {"type": "boolean"}, "photos": {"type": "integer"},
                    "embedded": {"type": "integer"}, "catalog_version": {"type": "integer"}}},
                "Status": {"type": "object", "properties": {
                    key: {"type": "object"} for key in (
                        "model", "catalog", "engine", "latency_ms", "scans", "camera", "mode",
                        "system", "ui")} | {"fps": {"type": "number"},
                                            "presence": {"type": "string"},
                                            "sync": _ref("Sync")}},
                "Sync": {"type": "object", "required": ["state", "outbox"],
                         "description": "the fleet agent in the kiosk's process (storyscan "
                                        "kiosk --agent); only state and outbox (null) when "
                                        "there is none",
                         "properties": {
                             "state": {"type": "string",
                                       "enum": ["connected", "disconnected", "not configured"]},
                             "broker": {"type": "string", "description": "host:port"},
                             "tls": {"type": "boolean"}, "device": {"type": "string"},
                             "fleet": {"type": "string"}, "group": {"type": "string"},
                             "outbox": {"oneOf": [_ref("Outbox"), {"type": "null"}]},
                             "connected": {"type": "boolean"},
                             "published": {"type": "integer",
                                           "description": "messages the broker acknowledged"},
                             "refused": {"type": "integer",
                                         "description": "messages the broker refused"},
                             "last_refusal": {"type": ["string", "null"]},
                             "connects": {"type": "integer"}}},
                "Outbox": {"type": "object", "description": "what the device still owes the "
                                                            "fleet (device/outbox.py)",
                           "properties": {
                               key: {"type": "integer"} for key in (
                                   "pending_scans", "pending_telemetry", "pending_acks",
                                   "max_rows", "dropped_telemetry", "scan_seq",
                                   "scan_cursor")} | {"behind": {"type": "boolean"}}},
            },
        },
    }
