"""The kiosk's web UI: the shopper's screen, staff inventory and enrolment, the status page
and the JSON API, for one running Kiosk (see kiosk_ui/app.py and README "Kiosk UI").

`create_app` is imported on first use, so the command line can read the UI's config and
errors without loading Flask.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from kiosk_ui.app import create_app

        return create_app
    raise AttributeError(f"module 'kiosk_ui' has no attribute {name!r}")
