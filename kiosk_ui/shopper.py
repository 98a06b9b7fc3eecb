"""The shopper's screen: the idle screen with the live preview, result cards pushed by
Server-Sent Events, catalog photos."""

from __future__ import annotations

import json
import queue

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    render_template,
    request,
    send_from_directory,
    stream_with_context,
)
from werkzeug.exceptions import Forbidden, ServiceUnavailable

from kiosk_ui import data
from kiosk_ui.i18n import STRINGS
from kiosk_ui.security import is_staff

bp = Blueprint("shopper", __name__)

MEDIA_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
LOOPBACK = {"127.0.0.1", "::1"}


def preview_allowed() -> bool:
    """The camera sees the counter and the people at it: its picture goes to the kiosk's own
    screen (loopback) and to staff; phones on the shop's network only upload photos, unless
    the device config says "public_preview": true."""
    return (request.remote_addr in LOOPBACK or bool(current_app.config["PUBLIC_PREVIEW"])
            or is_staff())


def _require_preview() -> None:
    if not preview_allowed():
        raise Forbidden("the live picture is shown on the kiosk's own screen only")


def _state():
    return current_app.extensions["storyscan"]


@bp.get("/")
def index():
    cat = data.catalog()
    langs = cat.languages() or ["en"]
    page = {"languages": data.languages_json(langs), "strings": STRINGS,
            "card_seconds": current_app.config["CARD_SECONDS"],
            "shop_name": current_app.config["SHOP_NAME"], "products": len(cat)}
    return render_template("shopper.html", page=page, languages=page["languages"],
                           preview=preview_allowed())


@bp.get("/events")
def events():
    """Server-Sent Events: `event: scan` with the result card of every scan the kiosk records,
    a comment line as heartbeat. Each client has its own small queue."""
    state = _state()
    q = state.broadcaster.register()
    if q is None:
        raise ServiceUnavailable("too many open screens")
    heartbeat = current_app.config["SSE_HEARTBEAT_S"]

    def stream():
        try:
            yield "retry: 2000\n: connected\n\n"
            while not state.stopping.is_set():
                try:
                    item = q.get(timeout=heartbeat)
                except queue.Empty:
                    yield ": heartbeat\n\n"
                    continue
                card = data.scan_card(item, data.catalog(), item.get("counted"))
                yield (f"event: scan\nid: {item['id']}\n"
                       f"data: {json.dumps(card, ensure_ascii=False)}\n\n")
        finally:
            state.broadcaster.unregister(q)

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@bp.get("/preview.mjpg")
def preview():
    """The scan area, live: Motion-JPEG (multipart/x-mixed-replace), at most PREVIEW_FPS."""
    _require_preview()
    state = _state()
    if not state.preview.acquire():
        raise ServiceUnavailable("too many preview viewers")

    def stream():
        try:
            yield from state.preview.stream(state.stopping)
        finally:
            state.preview.release()

    return Response(stream(), mimetype="multipart/x-mixed-replace; boundary=frame",
                    headers={"Cache-Control": "no-store"})


@bp.get("/preview.jpg")
def snapshot():
    """The newest camera frame as one JPEG (503 when the camera has none)."""
    _require_preview()
    got = _state().preview.jpeg(after=0, timeout=2.0)
    if got is None:
        raise ServiceUnavailable("the camera has no picture yet")
    return Response(got[1], mimetype="image/jpeg", headers={"Cache-Control": "no-store"})


@bp.get("/media/<path:path>")
def media(path: str):
    """A catalog photo; send_from_directory refuses anything outside the media folder."""
    if not any(path.lower().endswith(s) for s in MEDIA_SUFFIXES):
        abort(404)
    return send_from_directory(data.catalog().media, path, max_age=3600)

