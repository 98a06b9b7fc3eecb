"""Staff login (PIN, rate-limited per client, idle expiry) and CSRF protection.

The PIN is checked against its hash in the device config. A client (its address) that gets it
wrong `max_failures` times in a row is locked out for `lock_seconds`, right PIN or not. A staff
session ends after PERMANENT_SESSION_LIFETIME without a staff request (checked on the server
from a time stored in the signed session, not left to the browser's cookie expiry).

Every POST, PUT, PATCH and DELETE must carry the session's CSRF token: a hidden `csrf_token`
field in forms, an `X-CSRF-Token` header from the pages' scripts and API clients (GET
/api/session gives it).
"""

from __future__ import annotations

import functools
import hmac
import math
import secrets
import threading
import time
from urllib.parse import urlsplit

from flask import abort, current_app, flash, redirect, request, session, url_for

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class PinGuard:
    """Failed PIN attempts per client."""

    def __init__(self, max_failures: int = 5, lock_seconds: float = 300.0) -> None:
        self.max_failures, self.lock_seconds = max_failures, lock_seconds
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, locked until)
        self._lock = threading.Lock()

    def locked_for(self, client: str) -> float:
        """Seconds the client is still locked out (0: free to try)."""
        with self._lock:
            until = self._failures.get(client, (0, 0.0))[1]
            left = until - time.monotonic()
            if until and left <= 0:  # the lock ran out: a fresh start
                self._failures.pop(client, None)
                return 0.0
            return max(left, 0.0)

    def failed(self, client: str) -> int:
        """Count a wrong PIN; returns the tries left (0: this one locked the client out)."""
        with self._lock:
            if len(self._failures) > 10_000:  # never grows without bound
                now = time.monotonic()
                self._failures = {c: v for c, v in self._failures.items() if v[1] > now}
            failures = self._failures.get(client, (0, 0.0))[0] + 1
            until = time.monotonic() + self.lock_seconds if failures >= self.max_failures else 0.0
            self._failures[client] = (failures, until)
            return max(self.max_failures - failures, 0)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


# --- staff sessions ----------------------------------------------------------------------------


def _lifetime() -> float:
    return current_app.permanent_session_lifetime.total_seconds()


def log_in() -> None:
    session.clear()
    session.permanent = True
    session["staff_until"] = time.time() + _lifetime()
    session["csrf"] = secrets.token_urlsafe(32)  # a new token for the new privilege


def log_out() -> None:
    session.pop("staff_until", None)


def staff_state(refresh: bool = True) -> str:
    """'in', 'expired' (logged in, then idle too long) or 'out'. A staff request (`refresh`)
    moves the idle deadline on; other requests (the shopper's screen in the same browser) do
    not keep a staff session alive."""
    until = session.get("staff_until")
    if not until:
        return "out"
    if time.time() > until:
        if refresh:
            session.pop("staff_until", None)
        return "expired"
    if refresh:
        session["staff_until"] = time.time() + _lifetime()
    return "in"


def is_staff() -> bool:
    return staff_state(refresh=False) == "in"


def staff_required(json: bool = False):
    """A view for logged-in staff: others get 401 JSON (API) or the login page (pages)."""
    def decorate(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            state = staff_state()
            if state == "in":
                return view(*args, **kwargs)
            message = ("staff session expired: log in again" if state == "expired"
                       else "staff login required")
            if json:
                abort(401, message)
            flash(message, "error")
            return redirect(url_for("staff.login", next=request.full_path.rstrip("?")))
        return wrapped
    return decorate


def safe_next(target: str | None, default: str) -> str:
    """Only a path on this site (no scheme, no host, no '//' or backslash tricks)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else default


def attempt_login(pin: str) -> tuple[int, str, float]:
    """Check a PIN for this client: (status, message, seconds locked). 200 logs the session
    in; 401 wrong PIN; 429 locked out (now or already); 403 no PIN set on this kiosk."""
    from kiosk_ui import config as device_config

    state = current_app.extensions["storyscan"]
    client = request.remote_addr or "unknown"
    left = state.guard.locked_for(client)
    if left:
        return 429, f"too many wrong PINs: try again in {_minutes(left)}", left
    config = device_config.load(state.config_path)  # a PIN set while running counts at once
    if not config.get("pin_hash"):
        return (403, "staff mode is not set up: set a PIN on the kiosk with "
                     "'storyscan kiosk-pin'", 0.0)
    if device_config.check_pin(config, str(pin or "")):
        state.guard.succeeded(client)
        log_in()
        return 200, "logged in", 0.0
    tries = state.guard.failed(client)
    if tries == 0:
        lock = state.guard.lock_seconds
        return 429, f"wrong PIN too many times: locked for {_minutes(lock)}", lock
    return 401, f"wrong PIN ({tries} {'try' if tries == 1 else 'tries'} left)", 0.0


def _minutes(seconds: float) -> str:
    m = max(1, math.ceil(seconds / 60))
    return f"{m} minute{'s' if m != 1 else ''}"


# --- CSRF --------------------------------------------------------------------------------------


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """before_request: unsafe methods need the session's token."""
    if request.method not in UNSAFE_METHODS:
        return
    expected = session.get("csrf")
    sent = request.headers.get("X-CSRF-Token")
    if sent is None and request.mimetype in ("application/x-www-form-urlencoded",
                                             "multipart/form-data"):
        sent = request.form.get("csrf_token")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        abort(403, "missing or wrong CSRF token: reload the page and try again")
