"""The fleet database: what the controller heard from every device, SQLite or PostgreSQL.

`FleetDB("fleet.db")` (or `sqlite:///fleet.db`) is a SQLite file (WAL, synchronous=FULL);
`FleetDB("postgresql://user@host/db")` is PostgreSQL through psycopg 3 (`pip install
'storyscan[fleet]'`). One SQL text serves both: `?` placeholders become `%s` for psycopg, and
the only function that differs (max of two values) is chosen per dialect.

Tables: `devices` (one row per device: its retained status, versions, last seen), `scans`,
`telemetry` and `acks` (one row per event), and `rollouts` (staged model releases and how far
each went, fleet/rollout.py). Events have the primary key (fleet, device, seq)
and are inserted with ON CONFLICT DO NOTHING, so ingesting a message twice (a resend after a
lost PUBACK, a redelivery after a controller restart) stores its events once. Times are ISO
8601 UTC text; `day` is the scan's UTC date, for the per-day statistics.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("storyscan.fleet")

SCHEMA_VERSION = 1
POSTGRES = ("postgresql://", "postgres://")

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices (fleet TEXT NOT NULL, device TEXT NOT NULL, grp TEXT, "
    "state TEXT, state_since TEXT, last_seen TEXT, model TEXT, catalog_version BIGINT, "
    "software TEXT, status TEXT, PRIMARY KEY (fleet, device))",
    "CREATE TABLE IF NOT EXISTS scans (fleet TEXT NOT NULL, device TEXT NOT NULL, "
    "seq BIGINT NOT NULL, scan_id BIGINT, time TEXT, day TEXT, sku TEXT, name TEXT, "
    "unknown INTEGER, confidence DOUBLE PRECISION, similarity DOUBLE PRECISION, "
    "latency_ms DOUBLE PRECISION, mode TEXT, session TEXT, source TEXT, model TEXT, "
    "catalog_version BIGINT, received TEXT NOT NULL, PRIMARY KEY (fleet, device, seq))",
    "CREATE INDEX IF NOT EXISTS scans_day ON scans (fleet, day)",
    "CREATE TABLE IF NOT EXISTS telemetry (fleet TEXT NOT NULL, device TEXT NOT NULL, "
    "seq BIGINT NOT NULL, time TEXT, data TEXT NOT NULL, received TEXT NOT NULL, "
    "PRIMARY KEY (fleet, device, seq))",
    "CREATE TABLE IF NOT EXISTS acks (fleet TEXT NOT NULL, device TEXT NOT NULL, "
    "seq BIGINT NOT NULL, command_id TEXT, command TEXT, ok INTEGER, message TEXT, data TEXT, "
    "time TEXT, received TEXT NOT NULL, PRIMARY KEY (fleet, device, seq))",
    "CREATE INDEX IF NOT EXISTS acks_command ON acks (command_id)",
    # staged model rollouts (fleet/rollout.py); added without a schema version bump: CREATE
    # IF NOT EXISTS gives an older database the table when it is opened
    "CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, "
    "grp TEXT NOT NULL, version TEXT NOT NULL, model TEXT NOT NULL, topic TEXT NOT NULL, "
    "message TEXT NOT NULL, waves TEXT NOT NULL, advance_at DOUBLE PRECISION NOT NULL, "
    "halt_at DOUBLE PRECISION NOT NULL, wave INTEGER NOT NULL, targets TEXT, "
    "state TEXT NOT NULL, reason TEXT, started TEXT NOT NULL, updated TEXT NOT NULL)",
]

SCAN_FIELDS = ("scan_id", "time", "sku", "name", "unknown", "confidence", "similarity",
               "latency_ms", "mode", "session", "source", "model", "catalog_version")
STATS_BY = {"day": "day", "device": "device", "product": "sku"}


class FleetDBError(RuntimeError):
    """The fleet database cannot be opened or used; one line for the user."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class FleetDB:
    def __init__(self, url: str | Path) -> None:
        url = str(url)
        self.url = url
        self._lock = threading.RLock()
        if url.startswith(POSTGRES):
            try:
                import psycopg
            except ImportError:
                raise FleetDBError("a PostgreSQL fleet database needs psycopg: "
                                   "pip install 'storyscan[fleet]'") from None
            self.dialect = "postgresql"
            self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
            try:
                self.conn: Any = psycopg.connect(url, connect_timeout=10)
            except psycopg.Error as e:
                raise FleetDBError(f"cannot connect to the fleet database: "
                                   f"{str(e).strip().splitlines()[0]}") from None
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dialect = "sqlite"
            self._errors = (sqlite3.Error,)
            self.conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
        self.greatest = "greatest" if self.dialect == "postgresql" else "max"
        with self.transaction():
            for statement in SCHEMA:
                self._exec(statement)
            self._exec("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                       "DO NOTHING", ("schema_version", str(SCHEMA_VERSION)))

    # --- plumbing ------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def _exec(self, sql: str, params: tuple | list = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self._sql(sql), params)
        return cur

    def _rows(self, sql: str, params: tuple | list = ()) -> list[dict]:
        with self._lock:
            cur = self._exec(sql, params)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            self.conn.commit()  # end PostgreSQL's read transaction
            return rows

    class _Transaction:
        def __init__(self, db: FleetDB) -> None:
            self.db = db

        def __enter__(self) -> FleetDB:
            self.db._lock.acquire()
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                if exc_type is None:
                    self.db.conn.commit()
                else:
                    self.db.conn.rollback()
            finally:
                self.db._lock.release()

    def transaction(self) -> FleetDB._Transaction:
        return FleetDB._Transaction(self)

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """The driver's exceptions (a lost PostgreSQL connection, a locked SQLite file)."""
        return self._errors

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # --- ingest --------------------------------------------------------------------------------

    def ingest(self, fleet: str, device: str, leaf: str, body: dict, retained: bool = False,
               received: str | None = None) -> int:
        """Store one message from `storyscan/v1/<fleet>/<device>/<leaf>`; returns the number of
        new events (0 for a repeat). `retained`: delivered from the broker's store when the
        controller subscribed, not sent just now."""
        received = received or now_iso()
        with self.transaction():
            if leaf == "status":
                self._status(fleet, device, body, retained, received)
                return 0
            events = [e for e in body.get("events") or [] if isinstance(e, dict) and
                      _int(e.get("seq")) is not None]
            if len(events) != len(body.get("events") or []):
                log.warning("%s/%s: %d malformed %s events ignored", fleet, device,
                            len(body.get("events") or []) - len(events), leaf)
            new = 0
            if events:
                table = {"scans": "scans", "telemetry": "telemetry", "ack": "acks"}[leaf]
                seqs = [int(e["seq"]) for e in events]
                have = {r[0] for r in self._exec(
                    f"SELECT seq FROM {table} WHERE fleet = ? AND device = ? AND seq >= ? AND "
                    "seq <= ?", (fleet, device, min(seqs), max(seqs))).fetchall()}
                fresh = {int(e["seq"]): e for e in events if int(e["seq"]) not in have}
                new = len(fresh)
                if fresh:
                    getattr(self, f"_insert_{table}")(fleet, device, list(fresh.values()),
                                                      received)
            if not retained:
                self._exec(
                    "INSERT INTO devices (fleet, device, last_seen) VALUES (?, ?, ?) "
                    "ON CONFLICT (fleet, device) DO UPDATE SET last_seen = "
                    f"{self.greatest}(COALESCE(devices.last_seen, ''), excluded.last_seen)",
                    (fleet, device, received))
            return new

    def _insert_scans(self, fleet: str, device: str, events: list[dict], received: str) -> None:
        rows = []
        for e in events:
            time = str(e.get("time") or received)
            values = {k: e.get(k) for k in SCAN_FIELDS}
            values["unknown"] = int(bool(values["unknown"]))
            values["scan_id"] = _int(values["scan_id"])
            values["catalog_version"] = _int(values["catalog_version"])
            rows.append((fleet, device, int(e["seq"]), *values.values(), time[:10], received))
        columns = ", ".join(SCAN_FIELDS)
        self.conn.cursor().executemany(self._sql(
            f"INSERT INTO scans (fleet, device, seq, {columns}, day, received) VALUES "
            f"({', '.join('?' * (len(SCAN_FIELDS) + 5))}) ON CONFLICT DO NOTHING"), rows)

    def _insert_telemetry(self, fleet: str, device: str, events: list[dict],
                          received: str) -> None:
        self.conn.cursor().executemany(self._sql(
            "INSERT INTO telemetry (fleet, device, seq, time, data, received) VALUES "
            "(?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
            [(fleet, device, int(e["seq"]), e.get("time"),
              json.dumps({k: v for k, v in e.items() if k != "seq"}, default=str), received)
             for e in events])

    def _insert_acks(self, fleet: str, device: str, events: list[dict], received: str) -> None:
        self.conn.cursor().executemany(self._sql(
            "INSERT INTO acks (fleet, device, seq, command_id, command, ok, message, data, "
            "time, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
            [(fleet, device, int(e["seq"]), e.get("id"), e.get("command"),
              int(bool(e.get("ok"))), e.get("message"),
              None if e.get("data") is None else json.dumps(e["data"], default=str),
              e.get("time"), received) for e in events])

    def _status(self, fleet: str, device: str, body: dict, retained: bool,
                received: str) -> None:
        state = str(body.get("state") or "unknown")
        since = body.get("time") or (None if retained else received)
        online = state == "online"
        self._exec(
            "INSERT INTO devices (fleet, device, grp, state, state_since, last_seen, model, "
            "catalog_version, software, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (fleet, device) DO UPDATE SET "
            "grp = COALESCE(excluded.grp, devices.grp), state = excluded.state, "
            "state_since = COALESCE(excluded.state_since, devices.state_since), "
            f"last_seen = NULLIF({self.greatest}(COALESCE(devices.last_seen, ''), "
            "COALESCE(excluded.last_seen, '')), ''), "
            "model = COALESCE(excluded.model, devices.model), "
            "catalog_version = COALESCE(excluded.catalog_version, devices.catalog_version), "
            "software = COALESCE(excluded.software, devices.software), "
            "status = excluded.status",
            (fleet, device, body.get("group"), state, since,
             received if online and not retained else None,
             body.get("model") if online else None,
             _int(body.get("catalog_version")) if online else None,
             body.get("software") if online else None, json.dumps(body, default=str)))

    # --- reading -------------------------------------------------------------------------------

    def count(self, table: str, fleet: str | None = None, device: str | None = None) -> int:
        if table not in ("scans", "telemetry", "acks", "devices"):
            raise ValueError(table)
        where, params = self._where(fleet, device)
        return self._rows(f"SELECT count(*) AS n FROM {table}{where}", params)[0]["n"]

    @staticmethod
    def _where(fleet: str | None, device: str | None = None,
               *more: tuple[str, object]) -> tuple[str, list]:
        """A WHERE clause (or "") and its parameters: the fleet, the device and any further
        (condition, value) pairs, each left out when its value is empty."""
        pairs = [("fleet = ?", fleet), ("device = ?", device), *more]
        kept = [(clause, value) for clause, value in pairs if value]
        return ((" WHERE " + " AND ".join(c for c, _ in kept)) if kept else "",
                [v for _, v in kept])

    def scans(self, fleet: str | None = None, device: str | None = None) -> list[dict]:
        where, params = self._where(fleet, device)
        return self._rows(f"SELECT * FROM scans{where} ORDER BY fleet, device, seq", params)

    def acks(self, command_id: str | None = None) -> list[dict]:
        if command_id is None:
            return self._rows("SELECT * FROM acks ORDER BY received")
        return self._rows("SELECT * FROM acks WHERE command_id = ? ORDER BY received",
                          [command_id])

    def status(self, fleet: str | None = None, stale_s: float = 300.0) -> list[dict]:
        """One row per device: state (online, offline, or stale: online but silent for
        `stale_s`), since when, last seen, versions, scans stored and missing (seqs below the
        newest not received yet), the outbox's dropped telemetry and the latest load."""
        where, params = self._where(fleet)
        devices = self._rows(f"SELECT * FROM devices{where} ORDER BY fleet, device", params)
        counts = {(r["fleet"], r["device"]): r for r in self._rows(
            f"SELECT fleet, device, count(*) AS n, max(seq) AS last_seq FROM scans{where} "
            "GROUP BY fleet, device", params)}
        stale_before = (datetime.now(UTC) - timedelta(seconds=stale_s)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out = []
        for d in devices:
            c = counts.get((d["fleet"], d["device"]), {"n": 0, "last_seq": 0})
            latest = self._rows("SELECT data FROM telemetry WHERE fleet = ? AND device = ? "
                                "ORDER BY seq DESC LIMIT 1", [d["fleet"], d["device"]])
            t = json.loads(latest[0]["data"]) if latest else {}
            status = json.loads(d["status"]) if d["status"] else {}
            state = d["state"] or "unknown"
            if state == "online" and (d["last_seen"] or "") <= stale_before:
                state = "stale"
            dropped = (t.get("outbox") or status.get("outbox") or {}).get("dropped_telemetry")
            out.append({
                "fleet": d["fleet"], "device": d["device"], "group": d["grp"], "state": state,
                "since": d["state_since"], "last_seen": d["last_seen"], "model": d["model"],
                "catalog": d["catalog_version"],
                "catalog_release": status.get("catalog_release"), "software": d["software"],
                "scans": c["n"], "missing": (c["last_seq"] or 0) - c["n"],
                "dropped_telemetry": dropped,
                "cpu_percent": (t.get("system") or {}).get("cpu_percent"),
                "fps": (t.get("kiosk") or {}).get("fps"),
                "latency_p95_ms": (t.get("kiosk") or {}).get("latency_p95_ms"),
                "reason": status.get("reason")})
        return out

    # --- rollouts ------------------------------------------------------------------------------

    def add_rollout(self, rollout: dict) -> None:
        """Record a new rollout; an unfinished one of the same group is superseded by it."""
        with self.transaction():
            self._exec("UPDATE rollouts SET state = 'superseded', updated = ? WHERE fleet = ? "
                       "AND grp = ? AND state IN ('rolling', 'halted')",
                       (rollout["updated"], rollout["fleet"], rollout["grp"]))
            columns = list(rollout)
            self._exec(f"INSERT INTO rollouts ({', '.join(columns)}) VALUES "
                       f"({', '.join('?' * len(columns))})", [rollout[c] for c in columns])

    def update_rollout(self, rollout_id: str, **values: Any) -> None:
        values["updated"] = now_iso()
        with self.transaction():
            self._exec(f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in values)} "
                       "WHERE id = ?", [*values.values(), rollout_id])

    def rollouts(self, fleet: str | None = None, state: str | None = None) -> list[dict]:
        """Rollouts, newest first."""
        where, params = self._where(fleet, None, ("state = ?", state))
        return self._rows(f"SELECT * FROM rollouts{where} ORDER BY started DESC, id", params)

    def group_devices(self, fleet: str, group: str) -> list[dict]:
        """The devices that said they belong to `group`: name, state and running model."""
        return self._rows("SELECT device, state, model FROM devices WHERE fleet = ? AND "
                          "grp = ? ORDER BY device", [fleet, group])

    def release_acks(self, fleet: str, since: str) -> list[dict]:
        """Model-release results acked since `since` (ISO time received), oldest first."""
        return self._rows("SELECT device, ok, message, data FROM acks WHERE fleet = ? AND "
                          "command = 'release-model' AND received >= ? ORDER BY received, seq",
                          [fleet, since])

    def stats(self, by: list[str], fleet: str | None = None, since: str | None = None,
              until: str | None = None) -> list[dict]:
        """Scans counted per `by` (any of day, device, product), optionally from `since` to
        `until` (UTC dates, inclusive); unknown items are counted under product "(unknown)"."""
        if not by or any(b not in STATS_BY for b in by):
            raise ValueError(f"group by {by}: choose from {', '.join(STATS_BY)}")
        cond, params = self._where(fleet, None, ("day >= ?", since), ("day <= ?", until))
        cols = ["COALESCE(sku, '(unknown)') AS product" if b == "product" else STATS_BY[b]
                for b in by]
        group = ", ".join("COALESCE(sku, '(unknown)')" if b == "product" else STATS_BY[b]
                          for b in by)
        name = ", max(name) AS name" if "product" in by else ""
        return self._rows(f"SELECT {', '.join(cols)}{name}, count(*) AS scans, "
                          f"sum(unknown) AS unknown FROM scans{cond} GROUP BY {group} "
                          f"ORDER BY {group}", params)
