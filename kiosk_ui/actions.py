"""What the staff pages and the API both do: recognise an upload, run inventory sessions,
take camera captures and enrol a product. Errors a user can fix are `ActionError`s with an
HTTP status and one line."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from flask import current_app, session
from werkzeug.datastructures import FileStorage

from device.camera import CameraError
from device.catalog import SKU_PATTERN, Catalog, CatalogError, Product
from device.inventory import InventoryConflict, InventoryError, parse_expected_csv
from kiosk_ui import data
from kiosk_ui.captures import CapturesFull
from kiosk_ui.live import encode_jpeg
from models.preprocess import ImageError, decode_image, sniff_format

MAX_ENROL_PHOTOS = 12
MAX_TEXT = 4000
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WebP": "webp", "BMP": "bmp"}


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _state():
    return current_app.extensions["storyscan"]


def _wait(future, timeout: float, what: str):
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        future.cancel()
        raise ActionError(503, f"the kiosk did not finish {what} in time: is its loop "
                               "running?") from None


def read_photo(upload: FileStorage | None, label: str = "photo") -> tuple[bytes, object]:
    """The upload's bytes and its decoded RGB image; only real, complete images get through."""
    if upload is None or (not upload.filename and not upload.content_length):
        raise ActionError(400, f"no {label} uploaded (a file field named '{label}')")
    blob = upload.read()
    try:
        return blob, decode_image(blob, label)
    except ImageError as e:
        status = 415 if e.problem.startswith(("not an image", "empty file")) else 400
        raise ActionError(status, str(e)) from None


def recognise(upload: FileStorage | None, mode: str = "upload",
              session: str | None = None) -> dict:
    """Recognise an uploaded photo through the kiosk (centre-crop, same pipeline as the
    camera); returns the result card."""
    _, image = read_photo(upload)
    state = _state()
    if not state.upload_slots.acquire(blocking=False):
        raise ActionError(503, "the kiosk is busy with other uploads: try again in a moment")
    try:
        future = state.kiosk.submit(image, mode=mode, session=session)
        scan = _wait(future, current_app.config["UPLOAD_TIMEOUT_S"], "recognising the photo")
    finally:
        state.upload_slots.release()
    return data.scan_card(scan.to_dict(), data.catalog(), state.counted.get(scan.id))


def correct(scan_id: int, sku: str) -> dict:
    """"Not this one?": scan `scan_id` was really `sku`; kept for retraining."""
    if not isinstance(sku, str) or data.catalog().product(sku) is None:
        raise ActionError(400, f"{str(sku)[:64]!r} is not a product in the catalog")
    try:
        return data.scan_log().correct(scan_id, sku)
    except KeyError:
        raise ActionError(404, f"no scan {scan_id}") from None


# --- inventory ---------------------------------------------------------------------------------


def _inventory_error(e: InventoryError) -> ActionError:
    return ActionError(409 if isinstance(e, InventoryConflict) else 400, str(e))


def session_or_404(session_id: int) -> dict:
    session = data.inventory().session(session_id)
    if session is None:
        raise ActionError(404, f"no inventory session {session_id}")
    return session


def start_inventory(name: str) -> dict:
    try:
        session = data.inventory().start(name or "")
    except InventoryError as e:
        raise _inventory_error(e) from None
    _state().kiosk.set_mode("inventory", str(session["id"]))
    return session


def close_inventory(session_id: int) -> dict:
    session_or_404(session_id)
    try:
        session = data.inventory().close(session_id)
    except InventoryError as e:
        raise _inventory_error(e) from None
    kiosk = _state().kiosk
    if kiosk.mode == "inventory" and kiosk.session == str(session_id):
        kiosk.set_mode("shopper")
    return session


def adjust(session_id: int, sku: str, delta: int) -> int:
    session_or_404(session_id)
    if not isinstance(delta, int) or isinstance(delta, bool) or not -1000 <= delta <= 1000:
        raise ActionError(400, "delta must be a whole number from -1000 to 1000")
    try:
        return data.inventory().adjust(session_id, sku, delta)
    except InventoryError as e:
        raise _inventory_error(e) from None


def import_expected(session_id: int, text: str) -> dict:
    session_or_404(session_id)
    try:
        rows = parse_expected_csv(text)
        n = data.inventory().import_expected(session_id, rows)
    except InventoryError as e:
        raise _inventory_error(e) from None
    known = set(data.catalog().skus())
    return {"imported": n, "not_in_catalog": sorted({s for s, _ in rows} - known)}


def read_csv_upload(upload: FileStorage | None) -> str:
    if upload is None:
        raise ActionError(400, "no CSV uploaded (a file field named 'file')")
    try:
        return upload.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ActionError(400, "the CSV is not UTF-8 text") from None


def counts(session_id: int) -> list[dict]:
    names = {p.sku: p.name for p in data.catalog().products()}
    return [{**r, "name": names.get(r["sku"], "")}
            for r in data.inventory().counts(session_id)]


def export_csv(session_id: int) -> str:
    session_or_404(session_id)
    names = {p.sku: p.name for p in data.catalog().products()}
    return data.inventory().export_csv(session_id, names)


# --- camera captures for enrolment -------------------------------------------------------------

CAPTURE_WIDTH = 1024  # a capture wider than this is scaled down (the model sees far less)


def capture_key() -> str | None:
    """This browser session's key to its captures (kiosk_ui/captures.py)."""
    return session.get("captures")


def capture() -> int:
    """Keep the kiosk's current view of the scan area, cut out as a scan cuts it, for this
    session's next enrolment; returns the capture's number."""
    state = _state()
    try:
        image = state.kiosk.capture()
    except CameraError as e:
        raise ActionError(503, f"cannot capture: {e}") from None
    key = capture_key() or session.setdefault("captures", secrets.token_urlsafe(16))
    try:
        return state.captures.add(key, encode_jpeg(image, CAPTURE_WIDTH, 92))
    except CapturesFull as e:
        raise ActionError(409, str(e)) from None


def discard_capture(n: int) -> None:
    if not _state().captures.discard(capture_key(), n):
        raise ActionError(404, f"no capture {n}")


# --- enrolment ---------------------------------------------------------------------------------


def _line(form, name: str, limit: int) -> str:
    """One line of text, whitespace collapsed."""
    return " ".join(str(form.get(name, "")).split())[:limit]


def enrol(form, photos: list[FileStorage], captured: Sequence[Path] = ()) -> dict:
    """A new product (or more photos of one) from uploaded photos and camera captures (JPEG
    files), recognisable as soon as this returns: the kiosk embeds the photos and rebuilds its
    matcher on its own thread."""
    sku = _line(form, "sku", 64)
    if not SKU_PATTERN.fullmatch(sku):
        raise ActionError(400, "SKU: use letters, digits, '.', '_' and '-' (at most 64, "
                               "starting with a letter or digit)")
    photos = [p for p in photos if p and (p.filename or p.content_length)]
    if not photos and not captured:
        raise ActionError(400, "add at least one photo of the product")
    if len(photos) + len(captured) > MAX_ENROL_PHOTOS:
        raise ActionError(400, f"at most {MAX_ENROL_PHOTOS} photos at once")
    blobs = [read_photo(p, f"photo {i + 1}")[0] for i, p in enumerate(photos)]
    catalog = Catalog(_state().catalog_path)  # a writer's connection, this request's own
    try:
        with tempfile.TemporaryDirectory(prefix="storyscan-enrol-") as tmp:
            paths = []
            for i, blob in enumerate(blobs):
                path = Path(tmp) / f"upload-{i + 1}.{EXTENSIONS[sniff_format(blob)]}"
                path.write_bytes(blob)
                paths.append(path)
            paths += captured
            existing = catalog.product(sku)
            if existing is None:
                product = _new_product(form, sku, catalog, paths)
                version = catalog.upsert([product])
            else:
                version = catalog.add_photos(sku, paths)
        embedded = _wait(_state().kiosk.reload_catalog(), current_app.config["RELOAD_TIMEOUT_S"],
                         "taking in the new photos")
        product = catalog.product(sku)
    except CatalogError as e:
        raise ActionError(400, str(e)) from None
    finally:
        catalog.db.close()
    return {"sku": sku, "name": product.name, "new": existing is None,
            "photos": len(product.images), "embedded": embedded, "catalog_version": version}


def _new_product(form, sku: str, catalog: Catalog, paths: list[Path]) -> Product:
    name, category = _line(form, "name", 120), _line(form, "category", 64)
    if not name or not category:
        raise ActionError(400, f"{sku} is a new product: give its name and category")
    price_text = _line(form, "price", 20).replace(",", ".")
    try:
        price = float(price_text) if price_text else None
    except ValueError:
        price = -1.0
    if price is not None and not 0 <= price < 1e9:
        raise ActionError(400, "price: a number such as 24.50")
    currency = (_line(form, "currency", 8) or "EUR").upper()
    if not currency.isalpha() or len(currency) != 3:
        raise ActionError(400, "currency: three letters such as EUR")
    stories = {}
    for key in form:
        lang = key.removeprefix("story_")
        if key.startswith("story_") and lang.isalpha() and len(lang) <= 8:
            text = str(form.get(key, "")).strip()[:MAX_TEXT]
            if text:
                stories[lang.lower()] = text
    return Product(sku, name, category, price, currency, stories, [str(p) for p in paths])
