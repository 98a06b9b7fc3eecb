"""The fleet agent: the kiosk's link to its fleet over MQTT (paho-mqtt 2, MQTT 5).

Topics, all under `storyscan/v1/<fleet>/<device>/`:

- `status` (retained, QoS 1): the birth message on every connect, `{"state": "online", ...}`
  with the model key, catalog version and software version, the outbox's counters
  (`dropped_telemetry`); published again when a version changes. The Last Will, also retained,
  sets it to `{"state": "offline", "reason": "connection lost"}`; a clean stop publishes
  `"reason": "stopped"` itself.
- `telemetry` (QoS 1, through the outbox): every `agent.telemetry_every_s` seconds, the machine's
  CPU and GPU load, temperatures and power (jtop on a Jetson when `jtop` imports and its service
  answers, psutil elsewhere: kiosk_ui/system.py's SystemMonitor, the status page's reader), the
  kiosk's fps and scan latency (its health() when attached in-process, else latency from the
  scan log), and the outbox's counters.
- `scans` (QoS 1, through the outbox): scan events in batches of up to `agent.batch`.
- `ack` (QoS 1, through the outbox): each command's result.
- `cmd` (subscribed, QoS 1): commands, `{"id": ..., "command": ..., "args": {...}}`.

Every message on `scans`, `telemetry` and `ack` is `{"v": 1, "device": ..., "kind": ...,
"events": [{"seq": ..., ...}, ...]}`; (device, kind, seq) names an event for good (see
device/outbox.py), so the controller stores a resent one once.

Nothing is lost: an event is committed to the outbox before it is sent and deleted only when
the broker's PUBACK says success (MQTT 5 reason code below 0x80; a refusal such as 0x87 "not
authorised" keeps it and retries later). The session is persistent (clean start off, session
expiry `agent.session_expiry_s`), so commands sent while the device was away arrive when it
reconnects; paho resends unacknowledged messages after a reconnect, and a restarted process
sends what the outbox still holds.

Where scans come from: in the kiosk's process (`Agent(config, kiosk=kiosk)`) a listener on
`Kiosk.subscribe` inserts each scan on the kiosk's thread, through its own outbox connection;
standalone (`storyscan agent --config device.json`, its own systemd unit beside the kiosk's) the
agent reads new rows of the kiosk's scan log (`scans` table, device/scans.py) by id. Both keep
a cursor (the newest scan id in the outbox), and the in-process agent also catches up from the
scan log at start and whenever the outbox was too full for the listener, so every recorded
scan is sent exactly in order, once. One agent per outbox: a running agent holds an exclusive
lock on `<outbox>.lock`, so `storyscan agent` cannot start beside `storyscan kiosk --agent` on
the same device config (nor the other way round). `sync_state()` is the kiosk status page's view.

Commands are a registry (`COMMANDS`, `@command(name)`): each handler gets the agent and the
command's args and returns a Result, or a Future of one for work done elsewhere (the kiosk's
thread). Built now: `ping`, `set-config KEY VALUE` (persisted to the device config file, applied
at once) and `reload-catalog` (in the kiosk's process only; standalone it is acked as
unsupported here). A command the agent does not know is acked with an error. Model releases
(device/updates.py) subscribe to the group's retained `release/model` with `Agent.add_route`
and add the `rollback` command; catalog releases (device/catalog_updates.py) subscribe to its
retained `release/catalog`, and `versions()` reports the catalog release applied
(`catalog_release`) beside the catalog's own `catalog_version`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.files import write_json_atomic
from device.outbox import KINDS, Outbox

if TYPE_CHECKING:
    from device.kiosk import Kiosk, Scan

log = logging.getLogger("storyscan.agent")

PREFIX = "storyscan/v1"
# what the device publishes, per outbox kind (status is published directly, retained)
LEAF = {"scan": "scans", "telemetry": "telemetry", "ack": "ack"}
DEVICE_LEAVES = ("status", "telemetry", "scans", "ack")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # fleet, group and device names
RESERVED = frozenset({"groups"})  # storyscan/v1/<fleet>/groups/<group>/... is the group's


class ConfigError(ValueError):
    """A device or controller config that cannot be used; one line for the user."""


def check_name(kind: str, name: str) -> str:
    """Names become topic levels and broker usernames: letters, digits, '-' and '_' only."""
    if not NAME.match(name or ""):
        raise ConfigError(f"{kind} name {name!r}: use 1-63 letters, digits, '-' or '_' "
                          "(starting with a letter or digit)")
    if name in RESERVED:
        raise ConfigError(f"{kind} name {name!r} is reserved")
    return name


def device_topic(fleet: str, device: str, leaf: str) -> str:
    return f"{PREFIX}/{fleet}/{device}/{leaf}"


def group_topic(fleet: str, group: str, leaf: str) -> str:
    return f"{PREFIX}/{fleet}/groups/{group}/{leaf}"


def username(fleet: str, name: str) -> str:
    """The broker username of a device or controller: unique across fleets on one broker."""
    return f"{fleet}.{name}"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def software_version() -> str:
    try:
        return version("storyscan")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def parse_host_port(text: str, default_port: int = 8883) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdecimal() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker {text!r}: expected HOST:PORT")
    return host, int(port)


# --- broker connection -------------------------------------------------------------------------


@dataclass
class BrokerSettings:
    """Where and how to connect: from a device or controller config's "broker" object."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca: Path | None = None  # TLS: the fleet CA that signed the broker's certificate
    cert: Path | None = None  # TLS client certificate and key (require_certificate)
    key: Path | None = None
    keepalive: int = 30

    @classmethod
    def from_config(cls, data: dict, base: Path) -> BrokerSettings:
        if not isinstance(data, dict) or "host" not in data:
            raise ConfigError("the config has no broker (\"broker\": {\"host\": ..., "
                              "\"port\": ...})")
        tls = data.get("tls") or {}

        def path(key: str) -> Path | None:
            return base / tls[key] if tls.get(key) else None

        return cls(host=str(data["host"]), port=int(data.get("port", 8883)),
                   username=data.get("username"), password=data.get("password"),
                   ca=path("ca"), cert=path("cert"), key=path("key"),
                   keepalive=int(data.get("keepalive", 30)))

    def client(self, client_id: str, *, manual_ack: bool = False,
               reconnect: tuple[float, float] = (1.0, 60.0)) -> mqtt.Client:
        """A paho client (callback API 2, MQTT 5) with these credentials and TLS."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.ca or self.cert:
            for f in (self.ca, self.cert, self.key):
                if f is not None and not f.is_file():
                    raise ConfigError(f"TLS file {f} is missing")
            client.tls_set(ca_certs=str(self.ca) if self.ca else None,
                           certfile=str(self.cert) if self.cert else None,
                           keyfile=str(self.key) if self.key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(reconnect[0], reconnect[1])  # type: ignore[arg-type]
        return client


def connect_properties(session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


# --- the device config -------------------------------------------------------------------------

AGENT_DEFAULTS: dict[str, Any] = {
    "telemetry_every_s": 60.0,  # telemetry period
    "batch": 100,  # events per message
    "window": 10,  # messages awaiting their PUBACK at once
    "outbox_max_rows": 100_000,  # the outbox's bound (telemetry dropped first)
    "poll_s": 1.0,  # standalone: how often the scan log is read for new scans
    "reconnect_min_s": 1.0,  # reconnect backoff: doubles from min to max
    "reconnect_max_s": 60.0,
    "retry_refused_s": 30.0,  # a kind the broker refused is retried after this long
    "session_expiry_s": 7 * 24 * 3600,  # the broker keeps commands for an absent device
}
# set-config: the keys a command may change, with their check; the rest (identity, broker,
# paths) belongs to provisioning
SETTABLE: dict[str, Callable[[Any], Any]] = {}


def _number(kind: type, low: float, high: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}")
        if kind is int and value != int(value):
            raise ConfigError(f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"expected {low:g} to {high:g}, got {value!r}")
        return kind(value)

    return check


SETTABLE.update({
    "agent.telemetry_every_s": _number(float, 0.1, 86_400),
    "agent.batch": _number(int, 1, 1000),
    "agent.window": _number(int, 1, 100),
    "agent.outbox_max_rows": _number(int, 10, 10_000_000),
    "agent.poll_s": _number(float, 0.05, 60),
    "agent.retry_refused_s": _number(float, 0.1, 3600),
})


class DeviceConfig:
    """The device's JSON config (written by `storyscan provision`): identity, broker
    credentials and TLS files, topics, data paths and the agent's settings. Relative paths are
    relative to the file's folder. The file holds the broker password: mode 0600."""

    def __init__(self, path: str | Path, data: dict) -> None:
        self.path = Path(path)
        self.base = self.path.resolve().parent
        self.data = data
        try:
            self.device = check_name("device", data["device"])
            self.fleet = check_name("fleet", data["fleet"])
            self.group = check_name("group", data["group"])
        except KeyError as e:
            raise ConfigError(f"{self.path}: no {e.args[0]!r} in the device config") from None
        self.broker = BrokerSettings.from_config(data.get("broker"), self.base)
        agent = data.get("agent") or {}
        self.agent = {**AGENT_DEFAULTS, **{k: v for k, v in agent.items() if k in
                                           AGENT_DEFAULTS}}

    @classmethod
    def load(cls, path: str | Path) -> DeviceConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such device config") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the device config ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the device config is not a JSON object")
        return cls(path, data)

    def path_of(self, key: str, default: str | None = None) -> Path | None:
        value = (self.data.get("paths") or {}).get(key, default)
        return None if value is None else self.base / value

    @property
    def client_id(self) -> str:
        return username(self.fleet, self.device)

    def topic(self, leaf: str) -> str:
        return device_topic(self.fleet, self.device, leaf)

    def set(self, key: str, value: Any) -> Any:
        """Check, apply and persist one setting (atomically: a crash leaves the old file or
        the new one, never half of one); returns the value as stored."""
        check = SETTABLE.get(key)
        if check is None:
            raise ConfigError(f"{key!r} cannot be set remotely (settable: "
                              f"{', '.join(sorted(SETTABLE))})")
        value = check(value)
        section, name = key.split(".", 1)
        data = json.loads(json.dumps(self.data))
        data.setdefault(section, {})[name] = value
        write_json_atomic(self.path, data)
        self.data = data
        if section == "agent":
            self.agent[name] = value
        return value


# --- commands ----------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    message: str
    data: dict | None = None


Handler = Callable[["Agent", dict], "Result | Future"]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register a command handler: `handler(agent, args) -> Result | Future[Result]`."""
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = handler
        return handler

    return register


@command("ping")
def _ping(agent: Agent, args: dict) -> Result:
    return Result(True, "pong", {"time": now_iso(), **agent.versions(),
                                 "outbox": agent.outbox.stats()})


@command("set-config")
def _set_config(agent: Agent, args: dict) -> Result:
    key, value = args.get("key"), args.get("value")
    if not isinstance(key, str) or "value" not in args:
        raise ConfigError('set-config needs {"key": ..., "value": ...}')
    if isinstance(value, str):  # from the command line: "30" means the number 30
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    stored = agent.config.set(key, value)
    agent.apply_settings()
    return Result(True, f"{key} = {stored!r} (saved to {agent.config.path})",
                  {"key": key, "value": stored})


@command("reload-catalog")
def _reload_catalog(agent: Agent, args: dict) -> Result | Future:
    if agent.kiosk is None:
        return Result(False, "unsupported here: this agent runs apart from the kiosk "
                             "(restart the kiosk to load catalog changes)")
    kiosk = agent.kiosk
    done: Future = Future()

    def finished(f: Future) -> None:
        try:
            added = f.result()
            done.set_result(Result(True, f"catalog version {kiosk.catalog_version} loaded "
                                         f"({added} reference photos embedded)",
                                   {"catalog_version": kiosk.catalog_version,
                                    "embedded": added}))
        except Exception as e:
            done.set_result(Result(False, f"reload failed: {e}"))

    kiosk.reload_catalog().add_done_callback(finished)
    return done


# --- telemetry ---------------------------------------------------------------------------------


def _redact(uri: str) -> str:
    """A camera URI without its password (rtsp://user:pass@host/...)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (k - lo), 3)


SCAN_COLUMNS = ("id", "time", "sku", "name", "confidence", "similarity", "unknown",
                "latency_ms", "mode", "session", "source", "model", "catalog_version")


def event_from_row(row: sqlite3.Row | tuple) -> dict:
    """A scan event from a row of the kiosk's scan log."""
    r = dict(zip(SCAN_COLUMNS, row, strict=True))
    r["scan_id"] = r.pop("id")
    r["unknown"] = bool(r["unknown"])
    return r


def event_from_scan(scan: Scan, model: str, catalog_version: int) -> dict:
    """The same event from a Scan as the kiosk hands it to listeners."""
    r = scan.result
    return {"time": scan.time, "sku": r.sku, "name": r.name, "confidence": r.confidence,
            "similarity": r.similarity, "unknown": bool(r.unknown),
            "latency_ms": round(scan.latency_ms, 3), "mode": scan.mode,
            "session": scan.session, "source": r.source, "model": model,
            "catalog_version": catalog_version, "scan_id": scan.id}


class ScanLogReader:
    """The kiosk's scan log, read by id (never written): new scans and recent latency."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.path.is_file():
                return None  # the kiosk has not started yet
            self._db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=10,
                                       isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=10000")
        return self._db

    def after(self, scan_id: int, limit: int) -> list[tuple[int, dict]]:
        db = self._conn()
        if db is None:
            return []
        try:
            rows = db.execute(f"SELECT {', '.join(SCAN_COLUMNS)} FROM scans WHERE id > ? "
                              "ORDER BY id LIMIT ?", (scan_id, limit)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        return [(row[0], event_from_row(row)) for row in rows]

    def max_id(self) -> int:
        db = self._conn()
        if db is None:
            return 0
        try:
            return db.execute("SELECT coalesce(max(id), 0) FROM scans").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def latency(self, window_s: float = 60.0) -> dict:
        """Scan latency over the last minute, for a standalone agent's telemetry."""
        db = self._conn()
        if db is None:
            return {"scans_last_minute": 0, "latency_p50_ms": None, "latency_p95_ms": None}
        since = (datetime.now(UTC) - timedelta(seconds=window_s)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        try:
            values = [r[0] for r in db.execute(
                "SELECT latency_ms FROM scans WHERE time >= ? AND latency_ms IS NOT NULL",
                (since,))]
        except sqlite3.OperationalError:
            values = []
        return {"scans_last_minute": len(values), "latency_p50_ms": _percentile(values, 0.5),
                "latency_p95_ms": _percentile(values, 0.95)}

    def last_versions(self) -> tuple[str | None, int | None]:
        db = self._conn()
        if db is None:
            return None, None
        try:
            row = db.execute("SELECT model, catalog_version FROM scans ORDER BY id DESC "
                             "LIMIT 1").fetchone()
        except sqlite3.OperationalError:
            row = None
        return (row[0], row[1]) if row else (None, None)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _bundle_key(bundle: Path | None) -> str | None:
    """The model key the kiosk reports for a bundle (models/bundle.py's Bundle.key), from its
    manifest alone: the kiosk checks every file when it loads it."""
    import hashlib

    if bundle is None:
        return None
    try:
        raw = (bundle / "manifest.json").read_bytes()
        manifest = json.loads(raw)
        return f"{manifest['name']}@{manifest['version']}#{hashlib.sha256(raw).hexdigest()[:12]}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def catalog_meta(catalog: Path | None) -> dict[str, str]:
    """The catalog's `meta` table (its versions, device/catalog.py), read through a read-only
    connection of this call's own; {} when there is no catalog yet or it cannot be read."""
    if catalog is None or not catalog.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{catalog}?mode=ro", uri=True,
                                                timeout=5)) as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:
        return {}


# --- the agent ---------------------------------------------------------------------------------


@dataclass
class _Counters:
    published: int = 0  # messages the broker acknowledged
    refused: int = 0  # messages the broker refused (reason code >= 0x80)
    connects: int = 0
    last_refusal: str | None = None
    extra: dict = field(default_factory=dict)


class Agent:
    """Runs on its own thread (`start()`, or `run()` in the foreground) beside paho's network
    thread. Everything paho reports (connects, PUBACKs, messages) is queued to the agent's
    thread, which alone sends, deletes and runs commands."""

    def __init__(self, config: DeviceConfig, kiosk: Kiosk | None = None,
                 monitor: Any = None) -> None:
        self.config = config
        self.kiosk = kiosk
        a = config.agent
        outbox_path = config.path_of("outbox", "outbox.db")
        assert outbox_path is not None
        self.outbox = Outbox(outbox_path, a["outbox_max_rows"])
        scans = kiosk.scans.path if kiosk is not None else config.path_of("scans", "scans.db")
        self.scan_log = ScanLogReader(Path(scans))
        if monitor is None:
            from kiosk_ui.system import SystemMonitor  # psutil; jtop when it imports

            monitor = SystemMonitor()
        self.monitor = monitor
        self.handlers: dict[str, Handler] = dict(COMMANDS)
        self._routes: dict[str, Callable[[mqtt.MQTTMessage], None]] = {}
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[int, tuple[str, list[int]]] = {}  # mid -> (kind, outbox rows)
        self._sending: set[int] = set()
        self._held: dict[str, float] = {}  # kind -> retry time after a refusal
        self._connected = False
        self._status_sent: dict | None = None
        self._next_telemetry = 0.0
        self._next_poll = 0.0
        self._unsubscribe: Callable[[], None] | None = None
        self._outbox_lock: int | None = None  # the lock file's descriptor while running
        self.counters = _Counters()
        self.started = time.monotonic()
        self.client = config.broker.client(
            config.client_id, reconnect=(a["reconnect_min_s"], a["reconnect_max_s"]))
        self.client.will_set(config.topic("status"), self._status("offline", "connection lost"),
                             qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.add_route(config.topic("cmd"), self._on_command_message)
        # model releases: the group's retained release topic and the rollback command
        from device.updates import ModelUpdater

        self.updater = ModelUpdater(self)
        # catalog releases: the group's retained release/catalog topic
        from device.catalog_updates import CatalogUpdater

        self.catalog_updater = CatalogUpdater(self)

    # --- extension points ----------------------------------------------------------------------

    def add_route(self, topic: str, handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Subscribe to `topic` (QoS 1) on every connect and hand its messages to `handler`
        on the agent's thread."""
        self._routes[topic] = handler
        if self._connected:
            self.client.subscribe(topic, qos=1)

    def apply_settings(self) -> None:
        self.outbox.max_rows = self.config.agent["outbox_max_rows"]
        self._next_telemetry = min(self._next_telemetry,
                                   time.monotonic() + self.config.agent["telemetry_every_s"])

    # --- paho's thread: queue everything -------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.config.broker.host,
                      self.config.broker.port, reason_code)
            return
        client.subscribe([(topic, 1) for topic in self._routes])
        self._events.put(("connected", flags.session_present))
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._events.put(("disconnected", str(reason_code)))
        self._wake.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._events.put(("puback", mid, reason_code))
        self._wake.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self._events.put(("message", message))
        self._wake.set()

    # --- the kiosk's thread: record scans ------------------------------------------------------

    def _on_scan(self, scan: Scan) -> None:
        kiosk = self.kiosk
        assert kiosk is not None
        self.outbox.add_scans([(scan.id, event_from_scan(scan, kiosk.pipeline.bundle.key,
                                                         kiosk.catalog_version))])
        self._wake.set()

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> Agent:
        """Connect (retrying with backoff) and run on a background thread."""
        self._claim_outbox()  # a second agent on this outbox fails here, in the caller
        self._thread = threading.Thread(target=self.run, name="fleet-agent", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Connect and work until stop(): the foreground form of start()."""
        self._claim_outbox()
        b = self.config.broker
        if self.kiosk is not None:
            self.outbox.mark_behind()  # the listener waits for the first catch-up
            self._unsubscribe = self.kiosk.subscribe(self._on_scan)
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive, clean_start=False,
                                  properties=connect_properties(
                                      int(self.config.agent["session_expiry_s"])))
        self.client.loop_start()
        log.info("fleet agent %s: broker %s:%d%s, outbox %s, scans from %s", self.config.device,
                 b.host, b.port, " (TLS)" if b.ca else "", self.outbox.path,
                 "the kiosk in this process" if self.kiosk else self.scan_log.path)
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # a bug or a damaged file must not end the agent silently
                    log.exception("fleet agent step failed; carrying on")
                    self._stop.wait(1.0)
                self._wake.wait(self._timeout())
                self._wake.clear()
        finally:
            self._shutdown()

    def _claim_outbox(self) -> None:
        """One agent per outbox: a second one (`storyscan agent` beside a kiosk run with
        `--agent`) would send the same scans again under new sequence numbers. An exclusive
        lock on `<outbox>.lock`, held until the agent stops (or its process dies)."""
        if self._outbox_lock is not None:
            return
        fd = os.open(f"{self.outbox.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.outbox.path}: another fleet agent is running on this "
                              "outbox (a kiosk started with --agent, or 'storyscan agent'): "
                              "run one of them") from None
        self._outbox_lock = fd

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _shutdown(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._connected:
            info = self.client.publish(self.config.topic("status"),
                                       self._status("offline", "stopped"), qos=1, retain=True)
            with contextlib.suppress(Exception):
                info.wait_for_publish(timeout=3)
            self.client.disconnect()
        self.client.loop_stop()
        self.updater.close()
        self.catalog_updater.close()
        self.scan_log.close()
        self.outbox.close()
        self.monitor.close()
        if self._outbox_lock is not None:
            os.close(self._outbox_lock)  # closing the descriptor releases the lock
            self._outbox_lock = None
        log.info("fleet agent %s stopped", self.config.device)

    # --- the agent's thread --------------------------------------------------------------------

    def _timeout(self) -> float:
        now = time.monotonic()
        wait = self._next_telemetry - now
        if self.kiosk is None:
            wait = min(wait, self._next_poll - now)
        if self._held:
            wait = min(wait, min(self._held.values()) - now)
        return max(0.01, min(wait, 5.0))

    def _step(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._handle(event)
        now = time.monotonic()
        if self.kiosk is None:
            if now >= self._next_poll:
                self._next_poll = now + self.config.agent["poll_s"]
                self._catch_up()
        elif self.outbox.behind:
            self._catch_up()
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.config.agent["telemetry_every_s"]
            self.outbox.add_telemetry(self.telemetry())
            self._publish_status_if_changed()
        self._pump()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "connected":
            self._connected = True
            self.counters.connects += 1
            log.info("connected to %s:%d (session %s)", self.config.broker.host,
                     self.config.broker.port, "resumed" if event[1] else "new")
            self._publish_status()
        elif kind == "disconnected":
            if self._connected:
                log.warning("disconnected from the broker (%s); reconnecting", event[1])
            self._connected = False  # paho resends what is in flight once it is back
        elif kind == "puback":
            _, mid, reason = event
            sent = self._inflight.pop(mid, None)
            if sent is None:
                return  # a status message
            kind_, ids = sent
            self._sending.difference_update(ids)
            if reason.is_failure:
                self.counters.refused += 1
                self.counters.last_refusal = f"{reason} ({reason.value})"
                self._held[kind_] = time.monotonic() + self.config.agent["retry_refused_s"]
                log.error("the broker refused %d %s events: %s; kept, retrying in %g s",
                          len(ids), kind_, reason, self.config.agent["retry_refused_s"])
            else:
                self.outbox.delete(ids)
                self.counters.published += 1
        elif kind == "done":  # a command that finished elsewhere (the kiosk's thread)
            _, cid, name, future = event
            try:
                result = future.result()
            except Exception as e:
                result = Result(False, f"{type(e).__name__}: {e}")
            self._ack(cid, name, result)
        elif kind == "message":
            message = event[1]
            handler = self._routes.get(message.topic)
            if handler is not None:
                handler(message)
            else:
                for topic, h in self._routes.items():
                    if mqtt.topic_matches_sub(topic, message.topic):
                        h(message)
                        break

    def _catch_up(self) -> None:
        """Take the scan log's scans past the cursor into the outbox, while there is room."""
        try:
            while True:
                rows = self.scan_log.after(self.outbox.cursor, 500)
                if not rows:
                    break
                if self.outbox.add_scans(rows, from_log=True) < len(rows):
                    break  # full: the rest waits in the scan log
            self.outbox.caught_up(self.scan_log.max_id)
        except sqlite3.Error as e:  # the scan log is busy or damaged: try again next time
            log.warning("cannot read the scan log %s (%s)", self.scan_log.path, e)

    def _pump(self) -> None:
        """Publish outbox rows, oldest first, scans before acks before telemetry, keeping at
        most `window` messages waiting for their PUBACK."""
        if not self._connected:
            return
        a = self.config.agent
        now = time.monotonic()
        for kind in KINDS:
            if self._held.get(kind, 0) > now:
                continue
            self._held.pop(kind, None)
            while len(self._inflight) < a["window"]:
                rows = self.outbox.pending(kind, a["batch"], skip=self._sending)
                if not rows:
                    break
                payload = json.dumps({"v": 1, "device": self.config.device, "kind": kind,
                                      "events": [{"seq": r.seq, **r.event} for r in rows]},
                                     separators=(",", ":"), ensure_ascii=False, default=str)
                info = self.client.publish(self.config.topic(LEAF[kind]), payload, qos=1)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,
                                   MQTTErrorCode.MQTT_ERR_NO_CONN):
                    log.warning("publish failed (%s); retrying", mqtt.error_string(info.rc))
                    return
                ids = [r.id for r in rows]
                self._inflight[info.mid] = (kind, ids)
                self._sending.update(ids)

    # --- status, telemetry ---------------------------------------------------------------------

    def versions(self) -> dict:
        if self.kiosk is not None:
            model, catalog = self.kiosk.pipeline.bundle.key, self.kiosk.catalog_version
        else:
            model = _bundle_key(self.config.path_of("bundle"))
            version = catalog_meta(self.config.path_of("catalog")).get("version")
            catalog = int(version) if version is not None and version.isdecimal() else None
            if model is None or catalog is None:
                last_model, last_catalog = self.scan_log.last_versions()
                model = model or last_model
                catalog = catalog if catalog is not None else last_catalog
        return {"model": model, "catalog_version": catalog,
                "catalog_release": self.catalog_updater.applied, "software": software_version()}

    def _status(self, state: str, reason: str | None = None) -> str:
        body: dict = {"state": state, "device": self.config.device, "fleet": self.config.fleet,
                      "group": self.config.group, "time": now_iso()}
        if state == "online":
            body |= self.versions() | {
                "mode": "in-process" if self.kiosk is not None else "standalone",
                "outbox": self.outbox.stats()}
        else:
            body["reason"] = reason
        return json.dumps(body, separators=(",", ":"))

    def _publish_status(self) -> None:
        self._status_sent = self.versions()
        self.client.publish(self.config.topic("status"), self._status("online"), qos=1,
                            retain=True)

    def _publish_status_if_changed(self) -> None:
        if self._connected and self.versions() != self._status_sent:
            self._publish_status()

    def _mqtt_state(self) -> dict:
        return {"connected": self._connected, "published": self.counters.published,
                "refused": self.counters.refused, "last_refusal": self.counters.last_refusal,
                "connects": self.counters.connects}

    def sync_state(self) -> dict:
        """The link to the fleet as the kiosk's status page shows it; safe from any thread:
        the outbox is read through a read-only connection of this call's own (the outbox's
        connections belong to the threads that opened them), the counters are plain values
        the agent's thread sets."""
        b = self.config.broker
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.outbox.path}?mode=ro",
                                                    uri=True, timeout=5)) as db:
                outbox: dict | None = self.outbox.stats(db)
        except sqlite3.Error as e:
            outbox = None
            log.warning("cannot read the outbox %s (%s)", self.outbox.path, e)
        return {"state": "connected" if self._connected else "disconnected",
                "broker": f"{b.host}:{b.port}", "tls": bool(b.ca or b.cert),
                "device": self.config.device, "fleet": self.config.fleet,
                "group": self.config.group, "outbox": outbox, **self._mqtt_state()}

    def telemetry(self) -> dict:
        system = dict(self.monitor.read())
        sample: dict = {"time": now_iso(), "uptime_s": round(time.monotonic() - self.started, 1),
                        "system": system, **self.versions(), "outbox": self.outbox.stats(),
                        "mqtt": self._mqtt_state()}
        if self.kiosk is not None:
            health = self.kiosk.health()
            camera = dict(health.get("camera") or {})
            if "uri" in camera:
                camera["uri"] = _redact(str(camera["uri"]))
            sample["kiosk"] = {**health, "camera": camera}
        else:
            sample["kiosk"] = {"fps": None, **self.scan_log.latency()}
        return sample

    # --- commands ------------------------------------------------------------------------------

    def _on_command_message(self, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self._ack(None, None, Result(False, f"unreadable command ({e})"))
            return
        cid = body.get("id")
        cid = str(cid) if cid is not None else None
        name = body.get("command")
        args = body.get("args") or {}
        if cid is not None:
            done = self.outbox.done_command(cid)
            if done is not None:  # redelivered: ack again, do not run again
                log.info("command %s (%s) was already carried out; acking again", cid, name)
                self.outbox.add_ack(None, done)
                return
        handler = self.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            self._ack(cid, name, Result(False, f"unknown command {name!r} (this device knows: "
                                               f"{', '.join(sorted(self.handlers))})"))
            return
        if not isinstance(args, dict):
            self._ack(cid, name, Result(False, "args must be a JSON object"))
            return
        log.info("command %s: %s %s", cid, name, args)
        try:
            result = handler(self, args)
        except (ConfigError, ValueError, OSError) as e:
            result = Result(False, str(e))
        except Exception as e:
            log.exception("command %s failed", name)
            result = Result(False, f"{type(e).__name__}: {e}")
        if isinstance(result, Future):
            self.ack_when_done(cid, name, result)
            return
        self._ack(cid, name, result)

    def ack_when_done(self, cid: str | None, name: str | None, future: Future) -> None:
        """Ack the Result of work done elsewhere (a release's worker, the kiosk's thread) once
        it is done, on the agent's thread: the outbox's connection lives there."""
        def finished(f: Future) -> None:
            self._events.put(("done", cid, name, f))
            self._wake.set()

        future.add_done_callback(finished)

    def _ack(self, cid: str | None, name: str | None, result: Result) -> None:
        ack = {"id": cid, "command": name, "ok": result.ok, "message": result.message,
               "data": result.data, "time": now_iso()}
        self.outbox.add_ack(cid, ack)
        (log.info if result.ok else log.warning)("ack %s %s: %s", cid, name, result.message)


# --- storyscan agent ---------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    """The standalone agent: reads the kiosk's scan log, runs until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    agent = Agent(DeviceConfig.load(args.config))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    with contextlib.suppress(KeyboardInterrupt):
        agent.run()
    return 0


def register(sub: argparse._SubParsersAction) -> list[type[Exception]]:
    p = sub.add_parser("agent", help="run the fleet agent: scans, telemetry and status to the "
                                     "fleet's MQTT broker, commands from it")
    p.add_argument("--config", default=os.environ.get("STORYSCAN_DEVICE_CONFIG"),
                   required=not os.environ.get("STORYSCAN_DEVICE_CONFIG"),
                   help="the device config from 'storyscan provision' (default: "
                        "$STORYSCAN_DEVICE_CONFIG)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="the least severe log lines printed")
    p.set_defaults(func=cmd_agent)
    return [ConfigError]
