"""Serving the app in the kiosk's process: a threaded werkzeug server on a background thread
(the kiosk loop keeps the main thread, so Ctrl-C and SIGTERM stop both)."""

from __future__ import annotations

import logging
import threading

from werkzeug.serving import make_server

from kiosk_ui.config import ConfigError


class UIAddressError(ConfigError):
    """A --ui address that cannot be served; str() is one line."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or just PORT: 127.0.0.1); IPv6 as [::1]:8080."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise UIAddressError(f"--ui {text!r}: expected HOST:PORT such as 127.0.0.1:8080")
    return host, int(port)


class UIServer:
    def __init__(self, app, host: str, port: int) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        try:
            self.server = make_server(host, port, app, threaded=True)
        except OSError as e:
            raise UIAddressError(f"--ui {host}:{port}: cannot listen there ({e.strerror})"
                                 ) from None
        self.server.daemon_threads = True  # open streams never hold up the exit
        self.app = app
        self.thread = threading.Thread(target=self.server.serve_forever, name="kiosk-ui",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{port}/"

    def start(self) -> UIServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.app.extensions["storyscan"].close()  # ends the event and preview streams
        self.server.shutdown()
        self.thread.join(timeout=5)
        self.server.server_close()
