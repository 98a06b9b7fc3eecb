"""Staff pages: PIN login, inventory sessions, enrolling a product. Plain forms (each carries
the CSRF token) that redirect after posting; the pages' scripts make +/- and live counts
immediate through the API, and take and discard camera captures in place (the capture views
answer them in JSON, a plain form post with a redirect)."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from kiosk_ui import actions, data
from kiosk_ui.actions import ActionError
from kiosk_ui.app import wants_html
from kiosk_ui.security import attempt_login, log_out, safe_next, staff_required, staff_state

bp = Blueprint("staff", __name__)


def _state():
    return current_app.extensions["storyscan"]


def _back(endpoint: str, **values):
    return redirect(url_for(endpoint, **values), code=303)


@bp.get("", strict_slashes=False)
def home():
    state = staff_state()
    if state != "in":
        if state == "expired":
            flash("Your staff session expired: enter the PIN again.", "error")
        return redirect(url_for("staff.login"))
    inv = data.inventory()
    return render_template("staff.html", current=inv.open_session(),
                           sessions=inv.sessions(20), recent=data.scan_log().recent(8),
                           corrections=len(data.scan_log().corrections()),
                           default_name=f"Stock take {datetime.now(UTC):%Y-%m-%d}")


@bp.get("/login")
def login():
    if staff_state() == "in":
        return redirect(safe_next(request.args.get("next"), url_for("staff.home")))
    return render_template("login.html", next=request.args.get("next", ""))


@bp.post("/login")
def login_post():
    status, message, locked = attempt_login(request.form.get("pin", ""))
    if status == 200:
        return redirect(safe_next(request.form.get("next"), url_for("staff.home")), code=303)
    headers = {"Retry-After": str(int(locked) + 1)} if status == 429 else {}
    return (render_template("login.html", error=message, next=request.form.get("next", ""),
                            locked=status == 429), status, headers)


@bp.post("/logout")
def logout():
    log_out()
    flash("Logged out.", "ok")
    return _back("staff.login")


# --- inventory ---------------------------------------------------------------------------------


@bp.post("/inventory")
@staff_required()
def inventory_start():
    try:
        session = actions.start_inventory(request.form.get("name", ""))
    except ActionError as e:
        flash(e.message, "error")
        return _back("staff.home")
    flash(f"Counting for '{session['name']}': every product placed in front of the camera "
          "now counts one.", "ok")
    return _back("staff.inventory", session_id=session["id"])


@bp.get("/inventory/<int:session_id>")
@staff_required()
def inventory(session_id: int):
    session = actions.session_or_404(session_id)
    rows = actions.counts(session_id)
    only_off = request.args.get("view") == "discrepancies"
    if only_off:
        rows = [r for r in rows if r["difference"] != 0]
    products = data.catalog().products()
    photos = {p.sku: data.product_json(p, data.catalog().media, stories=False)["photo"]
              for p in products}
    return render_template("inventory.html", session=session, rows=rows, only_off=only_off,
                           products=products, photos=photos)


@bp.post("/inventory/<int:session_id>/adjust")
@staff_required()
def inventory_adjust(session_id: int):
    try:
        delta = int(request.form.get("delta", "1"))
    except ValueError:
        delta = 0
    try:
        count = actions.adjust(session_id, request.form.get("sku", ""), delta)
        flash(f"{request.form.get('sku')}: {count} counted.", "ok")
    except ActionError as e:
        flash(e.message, "error")
    return _back("staff.inventory", session_id=session_id)


@bp.post("/inventory/<int:session_id>/import")
@staff_required()
def inventory_import(session_id: int):
    try:
        result = actions.import_expected(
            session_id, actions.read_csv_upload(request.files.get("file")))
        note = (f" Not in the catalog: {', '.join(result['not_in_catalog'][:10])}."
                if result["not_in_catalog"] else "")
        flash(f"Expected counts for {result['imported']} products imported.{note}", "ok")
    except ActionError as e:
        flash(e.message, "error")
    return _back("staff.inventory", session_id=session_id)


@bp.get("/inventory/<int:session_id>/export.csv")
@staff_required()
def inventory_export(session_id: int):
    return csv_response(session_id)


def csv_response(session_id: int) -> Response:
    session = actions.session_or_404(session_id)
    body = actions.export_csv(session_id)
    day = session["started"][:10]
    return Response(body, mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="inventory-{session_id}-{day}.csv"'})


@bp.post("/inventory/<int:session_id>/close")
@staff_required()
def inventory_close(session_id: int):
    try:
        session = actions.close_inventory(session_id)
        flash(f"'{session['name']}' closed: the kiosk is back to the shopper's screen.", "ok")
    except ActionError as e:
        flash(e.message, "error")
    return _back("staff.inventory", session_id=session_id)


# --- enrolment ---------------------------------------------------------------------------------


@bp.get("/enrol")
@staff_required()
def enrol():
    cat = data.catalog()
    return render_template("enrol.html", languages=data.languages_json(cat.languages() or
                                                                        ["en"]),
                           categories=sorted({p.category for p in cat.products()}),
                           max_mb=current_app.config["ENROL_MAX_BYTES"] // 2**20,
                           captures=_captures(), capture_limit=_state().captures.limit)


@bp.post("/enrol")
@staff_required()
def enrol_post():
    captures, key = _state().captures, actions.capture_key()
    try:
        result = actions.enrol(request.form, request.files.getlist("photos"),
                               captures.paths(key))
    except ActionError as e:
        flash(e.message, "error")
        return _back("staff.enrol")
    captures.clear(key)  # they are in the catalog now
    what = "enrolled" if result["new"] else "has new photos"
    flash(f"{result['sku']} ({result['name']}) {what}: {result['photos']} reference photos, "
          "recognisable now.", "ok")
    return _back("staff.enrol")


# --- camera captures for enrolment -------------------------------------------------------------


def _captures() -> list[dict]:
    return [{"n": n, "url": url_for("staff.capture_image", n=n),
             "discard": url_for("staff.capture_discard", n=n)}
            for n in _state().captures.numbers(actions.capture_key())]


def _capture_answer(action, message: str):
    """Run a capture action: JSON for the page's script, flash and redirect for a form."""
    try:
        action()
    except ActionError as e:
        if not wants_html():
            raise  # the app's JSON error
        flash(e.message, "error")
        return _back("staff.enrol")
    if not wants_html():
        return jsonify(message=message, captures=_captures(),
                       limit=_state().captures.limit)
    flash(message, "ok")
    return _back("staff.enrol")


@bp.post("/enrol/captures")
@staff_required()
def capture():
    return _capture_answer(actions.capture, "Captured: Enrol below adds it to the product.")


@bp.post("/enrol/captures/<int:n>/discard")
@staff_required()
def capture_discard(n: int):
    return _capture_answer(lambda: actions.discard_capture(n), f"Capture {n} discarded.")


@bp.post("/enrol/captures/clear")
@staff_required()
def capture_clear():
    return _capture_answer(lambda: _state().captures.clear(actions.capture_key()),
                           "Captures discarded.")


@bp.get("/enrol/captures/<int:n>.jpg")
@staff_required()
def capture_image(n: int):
    jpeg = _state().captures.read(actions.capture_key(), n)
    if jpeg is None:
        abort(404)
    return Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "no-store"})
