"""The kiosk's web app: `create_app(kiosk)` serves the shopper's screen (/), the staff pages
(/staff, /status) and the JSON API (/api) for one running Kiosk.

The app never touches the kiosk's engine or database connections: recognising an upload and
picking up an enrolled product go through the kiosk's job queue (they run on the kiosk's
thread), scans come to the app through a kiosk listener, and every request opens its own
SQLite connections (kiosk_ui/data.py). Errors are JSON `{"error": "..."}` with their status
(a browser opening a page gets the same message as a page); no traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Flask, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from device.inventory import Inventory
from device.kiosk import Kiosk, Scan
from kiosk_ui import config as device_config
from kiosk_ui.actions import ActionError
from kiosk_ui.captures import Captures
from kiosk_ui.data import close_connections
from kiosk_ui.live import Broadcaster, Preview
from kiosk_ui.search import StoryIndex
from kiosk_ui.security import PinGuard, check_csrf, csrf_token, is_staff
from kiosk_ui.system import SystemMonitor

if TYPE_CHECKING:
    from device.sync import Agent

log = logging.getLogger("storyscan.ui")

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
SHORT_MESSAGES = {400: "bad request", 401: "login required", 403: "forbidden",
                  404: "not found", 405: "method not allowed",
                  413: f"upload too large (the limit is {MAX_UPLOAD_BYTES // 2**20} MB)",
                  429: "too many requests", 500: "internal error: the kiosk logged it",
                  503: "the kiosk is busy, try again"}

# The app that counts inventory scans for each kiosk: a newer app on the same kiosk takes over,
# so a scan is never counted twice.
_COUNTING: weakref.WeakKeyDictionary[Kiosk, UIState] = weakref.WeakKeyDictionary()


@dataclass
class UIState:
    """What the app shares across requests (app.extensions["storyscan"])."""

    kiosk: Kiosk
    catalog_path: Path
    scans_path: Path
    config_path: Path
    config: dict
    broadcaster: Broadcaster
    preview: Preview
    guard: PinGuard
    system: SystemMonitor
    search: StoryIndex
    upload_slots: threading.BoundedSemaphore
    captures: Captures  # staff camera captures waiting to be enrolled
    agent: Agent | None = None  # the fleet agent in the kiosk's process (--agent), if any
    stopping: threading.Event = field(default_factory=threading.Event)
    counted: dict[int, int] = field(default_factory=dict)  # scan id -> its product's count
    _local: threading.local = field(default_factory=threading.local)
    _unsubscribe: list = field(default_factory=list)

    def on_scan(self, scan: Scan) -> None:
        """The kiosk listener (on the kiosk's thread): count an inventory scan, then hand the
        scan to every open shopper page."""
        count = None
        if scan.mode == "inventory" and _COUNTING.get(self.kiosk) is self:
            inv = getattr(self._local, "inventory", None)
            if inv is None:  # a connection of the kiosk thread's own
                inv = self._local.inventory = Inventory(self.scans_path)
            sku = None if scan.result.unknown else scan.result.sku
            count = inv.count_scan(scan.mode, scan.session, sku)
            if count is not None:
                self.counted[scan.id] = count
                while len(self.counted) > 256:
                    self.counted.pop(next(iter(self.counted)))
        self.broadcaster.publish({**scan.to_dict(), "counted": count})

    def close(self) -> None:
        """Stop streaming, unsubscribe from the kiosk (the app serves nothing live after)."""
        self.stopping.set()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if _COUNTING.get(self.kiosk) is self:
            del _COUNTING[self.kiosk]
        self.system.close()
        self.captures.close()


def create_app(kiosk: Kiosk, config_path: str | Path | None = None,
               settings: dict | None = None, agent: Agent | None = None) -> Flask:
    """The app for `kiosk`. `config_path`: the device config with the staff PIN's hash
    (default kiosk.json beside the catalog; see kiosk_ui/config.py); `settings`: Flask config
    overrides (e.g. PERMANENT_SESSION_LIFETIME, PIN_MAX_FAILURES, PIN_LOCK_SECONDS,
    CAPTURE_LIMIT); `agent`: the fleet agent running in the kiosk's process, whose link and
    outbox the status page shows."""
    catalog_path = Path(kiosk.pipeline.catalog.path)
    config_path = Path(config_path) if config_path else device_config.default_path(catalog_path)
    config = device_config.ensure_secret(config_path)

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config["secret_key"],
        MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES,
        ENROL_MAX_BYTES=40 * 1024 * 1024,  # a few phone photos at once
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=15),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_NAME="storyscan_session",
        PIN_MAX_FAILURES=5,
        PIN_LOCK_SECONDS=300,
        UPLOAD_TIMEOUT_S=30.0,
        RELOAD_TIMEOUT_S=300.0,
        CAPTURE_LIMIT=8,  # camera captures a staff session keeps for one enrolment
        SSE_HEARTBEAT_S=15.0,
        PREVIEW_FPS=10.0,
        PREVIEW_WIDTH=640,
        CARD_SECONDS=int(config.get("card_seconds", 30)),
        SHOP_NAME=str(config.get("shop_name", "storyscan")),
        PUBLIC_PREVIEW=bool(config.get("public_preview", False)),
        PROPAGATE_EXCEPTIONS=False,  # even under app.testing: the JSON 500, never a trace
    )
    app.config.update(settings or {})
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    state = UIState(
        kiosk=kiosk, catalog_path=catalog_path, scans_path=Path(kiosk.scans.path),
        config_path=config_path, config=config, broadcaster=Broadcaster(),
        preview=Preview(kiosk.camera, app.config["PREVIEW_WIDTH"], app.config["PREVIEW_FPS"]),
        guard=PinGuard(app.config["PIN_MAX_FAILURES"], app.config["PIN_LOCK_SECONDS"]),
        system=SystemMonitor(), search=StoryIndex(),
        upload_slots=threading.BoundedSemaphore(4),
        captures=Captures(app.config["CAPTURE_LIMIT"],
                          app.permanent_session_lifetime.total_seconds()),
        agent=agent)
    app.extensions["storyscan"] = state
    _COUNTING[kiosk] = state
    state._unsubscribe.append(kiosk.subscribe(state.on_scan))
    _resume_inventory(state)

    from kiosk_ui.api import bp as api_bp
    from kiosk_ui.shopper import bp as shopper_bp
    from kiosk_ui.staff import bp as staff_bp
    from kiosk_ui.status import bp as status_bp

    app.register_blueprint(shopper_bp)
    app.register_blueprint(staff_bp, url_prefix="/staff")
    app.register_blueprint(status_bp, url_prefix="/status")
    app.register_blueprint(api_bp, url_prefix="/api")

    app.before_request(_upload_limit)  # before the CSRF check reads the form
    app.before_request(check_csrf)
    app.teardown_appcontext(close_connections)
    app.after_request(_security_headers)
    app.register_error_handler(ActionError, lambda e: error_response(e.status, e.message))
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    app.context_processor(lambda: {"csrf_token": csrf_token, "is_staff": is_staff,
                                   "shop_name": app.config["SHOP_NAME"]})
    return app


def _resume_inventory(state: UIState) -> None:
    """After a restart, an inventory session that was open goes on counting."""
    inv = Inventory(state.scans_path)
    try:
        current = inv.open_session()
    finally:
        inv.close_db()
    if current is not None:
        state.kiosk.set_mode("inventory", str(current["id"]))
    elif state.kiosk.mode == "inventory" and state.kiosk.session is None:
        state.kiosk.set_mode("shopper")


ENROL_ENDPOINTS = {"staff.enrol_post", "api.enrol"}


def _upload_limit() -> None:
    """Enrolment takes several photos at once: a larger limit there."""
    if request.endpoint in ENROL_ENDPOINTS:
        request.max_content_length = current_app.config["ENROL_MAX_BYTES"]


def _security_headers(response):
    h = response.headers
    h.setdefault("Content-Security-Policy",
                 "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                 "script-src 'self'; object-src 'none'; base-uri 'none'; "
                 "frame-ancestors 'none'; form-action 'self'")
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype in ("text/html", "application/json"):
        h.setdefault("Cache-Control", "no-store")
    return response


def wants_html() -> bool:
    """A browser opening a page (not the pages' scripts or an API client)."""
    if request.path.startswith("/api/"):
        return False
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


def error_response(status: int, message: str, headers: dict | None = None):
    if wants_html():
        response = render_template("error.html", status=status, message=message)
        return response, status, headers or {}
    return jsonify(error=message), status, headers or {}


def _http_error(e: HTTPException):
    code = e.code or 500
    description = e.description
    if not description or description == type(e).description:  # werkzeug's long default
        description = SHORT_MESSAGES.get(code, e.name.lower())
    headers = {}
    if code == 405 and e.valid_methods:
        headers["Allow"] = ", ".join(e.valid_methods)
    retry = getattr(e, "retry_after", None)
    if retry:
        headers["Retry-After"] = str(int(retry))
    return error_response(code, description, headers)


def _internal_error(e: Exception):
    log.exception("kiosk UI: %s %s failed", request.method, request.path)
    return error_response(500, SHORT_MESSAGES[500])
