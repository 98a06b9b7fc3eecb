"""The JSON API (/api): scans, products, story search, inventory, status, the staff session.
Described by the OpenAPI document at /api/openapi.json (kiosk_ui/openapi.py)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from kiosk_ui import actions, data
from kiosk_ui.actions import ActionError
from kiosk_ui.openapi import openapi_document
from kiosk_ui.security import attempt_login, csrf_token, is_staff, log_out, staff_required
from kiosk_ui.staff import csv_response
from kiosk_ui.status import status_json

bp = Blueprint("api", __name__)


def body() -> dict:
    """The request's JSON object (or its form fields)."""
    if request.is_json:
        obj = request.get_json(silent=True)
        if not isinstance(obj, dict):
            raise ActionError(400, "send a JSON object")
        return obj
    return request.form.to_dict()


def _limit(default: int, most: int) -> int:
    text = request.args.get("limit", str(default))
    if not text.isdecimal() or not 1 <= int(text) <= most:
        raise ActionError(400, f"limit: a whole number from 1 to {most}")
    return int(text)


# --- the staff session -------------------------------------------------------------------------


@bp.get("/session")
def session_get():
    return jsonify(staff=is_staff(), csrf_token=csrf_token())


@bp.post("/session")
def session_post():
    status, message, locked = attempt_login(str(body().get("pin", "")))
    if status == 200:
        return jsonify(staff=True, csrf_token=csrf_token())
    headers = {"Retry-After": str(int(locked) + 1)} if status == 429 else {}
    return jsonify(error=message), status, headers


@bp.delete("/session")
def session_delete():
    log_out()
    return jsonify(staff=False)


# --- catalog -----------------------------------------------------------------------------------


@bp.get("/catalog")
def catalog_info():
    cat = data.catalog()
    return jsonify(version=cat.version, products=len(cat),
                   languages=data.languages_json(cat.languages()))


@bp.get("/products")
def products():
    cat = data.catalog()
    category = request.args.get("category")
    items = [data.product_json(p, cat.media, stories=False) for p in cat.products()
             if category is None or p.category == category]
    return jsonify(products=items)


@bp.get("/products/<sku>")
def product(sku: str):
    cat = data.catalog()
    p = cat.product(sku)
    if p is None:
        raise ActionError(404, f"no product {sku[:64]!r}")
    return jsonify(data.product_json(p, cat.media))


@bp.post("/products")
@staff_required(json=True)
def enrol():
    """Enrol a product from uploaded photos (multipart: sku, name, category, price, currency,
    story_<lang>, photos)."""
    result = actions.enrol(request.form, request.files.getlist("photos"))
    return jsonify(result), 201 if result["new"] else 200


@bp.get("/search")
def search():
    q = request.args.get("q", "").strip()
    if not q:
        raise ActionError(400, "q: what to search for")
    lang = request.args.get("lang") or None
    cat = data.catalog()
    state = current_app.extensions["storyscan"]
    results = []
    for hit in state.search.search(cat, q, lang, _limit(20, 100)):
        p = cat.product(hit["sku"])
        if p is not None:
            results.append({**data.product_json(p, cat.media, stories=False),
                            "lang": hit["lang"], "snippet": hit["snippet"]})
    return jsonify(query=q, results=results)


# --- scans -------------------------------------------------------------------------------------


@bp.get("/scans")
def scans():
    return jsonify(scans=[data.scan_json(r) for r in data.scan_log().recent(_limit(20, 100))])


@bp.get("/scans/<int:scan_id>")
def scan(scan_id: int):
    rows = list(data.scan_log().db["scans"].rows_where("id = ?", [scan_id]))
    if not rows:
        raise ActionError(404, f"no scan {scan_id}")
    return jsonify(data.scan_card(rows[0], data.catalog()))


@bp.post("/scans")
def scan_upload():
    """Recognise an uploaded photo (multipart field `photo`); staff may count it towards the
    open inventory session (`mode=inventory`)."""
    mode, session = "upload", None
    if request.form.get("mode") == "inventory":
        if not is_staff():
            raise ActionError(401, "staff login required to count stock")
        current = data.inventory().open_session()
        if current is None:
            raise ActionError(409, "no inventory session is open")
        mode, session = "inventory", str(current["id"])
    card = actions.recognise(request.files.get("photo"), mode, session)
    return jsonify(card), 201


@bp.post("/scans/<int:scan_id>/correction")
def correction(scan_id: int):
    row = actions.correct(scan_id, body().get("sku"))
    return jsonify(row), 201


# --- inventory ---------------------------------------------------------------------------------


@bp.get("/inventory/sessions")
@staff_required(json=True)
def inventory_sessions():
    inv = data.inventory()
    return jsonify(open=inv.open_session(), sessions=inv.sessions(_limit(50, 500)))


@bp.post("/inventory/sessions")
@staff_required(json=True)
def inventory_start():
    return jsonify(actions.start_inventory(str(body().get("name", "")))), 201


@bp.get("/inventory/sessions/<int:session_id>")
@staff_required(json=True)
def inventory_session(session_id: int):
    return jsonify(session=actions.session_or_404(session_id),
                   counts=actions.counts(session_id))


@bp.post("/inventory/sessions/<int:session_id>/counts")
@staff_required(json=True)
def inventory_adjust(session_id: int):
    b = body()
    delta = b.get("delta", 1)
    if isinstance(delta, str) and delta.lstrip("-").isdecimal():
        delta = int(delta)
    sku = str(b.get("sku", ""))
    return jsonify(sku=sku, counted=actions.adjust(session_id, sku, delta))


@bp.post("/inventory/sessions/<int:session_id>/expected")
@staff_required(json=True)
def inventory_expected(session_id: int):
    """Expected counts: a CSV (sku,expected) as the file field `file` or a text/csv body."""
    if request.mimetype == "text/csv":
        try:
            text = request.get_data().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ActionError(400, "the CSV is not UTF-8 text") from None
    else:
        text = actions.read_csv_upload(request.files.get("file"))
    return jsonify(actions.import_expected(session_id, text))


@bp.get("/inventory/sessions/<int:session_id>/export.csv")
@staff_required(json=True)
def inventory_export(session_id: int):
    return csv_response(session_id)


@bp.post("/inventory/sessions/<int:session_id>/close")
@staff_required(json=True)
def inventory_close(session_id: int):
    return jsonify(actions.close_inventory(session_id))


# --- status and the API's description ----------------------------------------------------------


@bp.get("/status")
@staff_required(json=True)
def status():
    return jsonify(status_json())


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())
