"""The status page (staff only): model and catalog, engine, speed, camera, machine, sync.

Sync is the fleet agent's link when it runs in the kiosk's process (`storyscan kiosk --agent`):
connected or not, the broker, the outbox's depth and counters (Agent.sync_state); "not
configured" when there is none (a standalone `storyscan agent` reports to the fleet only)."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from kiosk_ui import data
from kiosk_ui.security import staff_required

bp = Blueprint("status", __name__)


def status_json() -> dict:
    state = current_app.extensions["storyscan"]
    kiosk = state.kiosk
    health = kiosk.health()  # thread-safe: counters, and attributes the kiosk sets
    bundle = kiosk.pipeline.bundle  # the manifest: plain data
    return {
        "model": {"key": health["model"], "name": bundle.name, "version": bundle.version,
                  "architecture": bundle.architecture},
        "catalog": {"version": health["catalog_version"], "products": len(data.catalog()),
                    "languages": data.catalog().languages()},
        "engine": health["engine"],
        "fps": health["fps"],
        "latency_ms": {"p50": health["latency_p50_ms"], "p95": health["latency_p95_ms"]},
        "scans": {"recorded": health["scans_recorded"],
                  "last_minute": health["scans_last_minute"]},
        "camera": health["camera"],
        "presence": health["presence"],
        "mode": {"mode": health["mode"], "session": health["session"]},
        "system": state.system.read(),
        "sync": (state.agent.sync_state() if state.agent is not None
                 else {"state": "not configured", "outbox": None}),
        "ui": {"screens": len(state.broadcaster), "preview_viewers": state.preview.clients},
    }


@bp.get("", strict_slashes=False)
@staff_required()
def page():
    return render_template("status.html", status=status_json())
