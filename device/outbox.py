"""The fleet agent's outbox: what the device still owes the fleet, durable until the broker has it.

Every event the agent sends (a scan, a telemetry sample, a command's ack) is first committed
here, in its own SQLite file (WAL, synchronous=FULL: a committed row survives a power cut or a
SIGKILL), and deleted only after the broker acknowledged the message that carried it (an MQTT 5
PUBACK with a success reason code). A crash between the PUBACK and the delete sends it again;
the controller stores each (device, kind, seq) once, so that costs nothing.

Each kind has its own sequence, persisted in the same transaction as the row: scan seq 1, 2, 3 …
never repeats and never goes back, even across restarts, so the controller can tell a repeated
event from a new one and count gaps. The outbox file is the device's memory of where it is:
deleting it restarts every sequence at 1 (the controller then ignores those events as repeats).

Bounded: at most `max_rows` rows. When full, the oldest telemetry is dropped first to make room
and the drop is counted (`dropped_telemetry`, reported in telemetry and status). Scans are never
dropped: a scan that finds no room is refused and stays in the kiosk's scan log, which is itself
durable; the agent catches up from there by scan id (`cursor`) once there is room again.
Acks are never dropped either; they are rare and tiny, so they may overshoot the bound.

Any thread may use one Outbox: each thread gets its own SQLite connection (the kiosk's listener
inserts scans on the kiosk's thread, the agent sends and deletes on its own), and every change
is one IMMEDIATE transaction, so the threads never see each other half-way.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("scan", "ack", "telemetry")  # the order the agent sends them in when it has a backlog


@dataclass(frozen=True)
class Row:
    id: int  # the outbox row (deleted after the PUBACK)
    kind: str
    seq: int  # the event's number on this device, per kind
    event: dict  # what is sent, without the seq


class Outbox:
    def __init__(self, path: str | Path, max_rows: int = 100_000) -> None:
        if max_rows < 1:
            raise ValueError("the outbox needs room for at least one row")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._local = threading.local()
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "kind TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL, "
                       "scan_id INTEGER, UNIQUE (kind, seq))")
            db.execute("CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
                       "value INTEGER NOT NULL)")
            # commands already carried out, with their ack: a redelivered command is acked
            # again, not run again
            db.execute("CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, "
                       "ack TEXT NOT NULL, seq INTEGER NOT NULL)")

    # --- connections ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def _write(self) -> _Transaction:
        return _Transaction(self._db())

    def close(self) -> None:
        """Close this thread's connection (other threads close their own)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- counters ------------------------------------------------------------------------------

    @staticmethod
    def _get(db: sqlite3.Connection, key: str, default: int = 0) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    @staticmethod
    def _set(db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = excluded.value", (key, int(value)))

    def _next_seqs(self, db: sqlite3.Connection, kind: str, n: int) -> range:
        first = self._get(db, f"{kind}_seq") + 1
        self._set(db, f"{kind}_seq", first + n - 1)
        return range(first, first + n)

    def _insert(self, db: sqlite3.Connection, kind: str, events: Sequence[dict],
                scan_ids: Sequence[int | None] | None = None) -> list[int]:
        seqs = self._next_seqs(db, kind, len(events))
        ids = scan_ids or [None] * len(events)
        db.executemany("INSERT INTO outbox (kind, seq, event, scan_id) VALUES (?, ?, ?, ?)",
                       [(kind, s, json.dumps(e, separators=(",", ":"), ensure_ascii=False), i)
                        for s, e, i in zip(seqs, events, ids, strict=True)])
        return list(seqs)

    def _count(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def _make_room(self, db: sqlite3.Connection, wanted: int) -> int:
        """Drop the oldest telemetry until `wanted` rows fit (or no telemetry is left);
        returns the room there is now."""
        free = self.max_rows - self._count(db)
        if free >= wanted:
            return free
        cur = db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind = "
                         "'telemetry' ORDER BY id LIMIT ?)", (wanted - free,))
        if cur.rowcount:
            self._set(db, "dropped_telemetry", self._get(db, "dropped_telemetry") + cur.rowcount)
        return free + cur.rowcount

    # --- adding --------------------------------------------------------------------------------

    def add_scans(self, scans: Iterable[tuple[int, dict]], from_log: bool = False) -> int:
        """Add scans `(scan_id, event)` in scan-id order, each once: ids at or below the cursor
        are already here (or were sent). Returns how many were added; fewer than given means
        the outbox is full (or, for the kiosk's listener, that it must wait for the catch-up
        from the scan log to reach it: see `behind`). `from_log`: the catch-up itself."""
        scans = list(scans)
        with self._write() as db:
            cursor = self._get(db, "scan_cursor")
            if not from_log and self._get(db, "behind"):
                return 0  # the catch-up reads it from the scan log, in order
            new = [(i, e) for i, e in scans if i > cursor]
            if not new:
                return 0
            room = self._make_room(db, len(new))
            take = new[:max(room, 0)]
            if len(take) < len(new):
                self._set(db, "behind", 1)
            if take:
                self._insert(db, "scan", [e for _, e in take], [i for i, _ in take])
                self._set(db, "scan_cursor", take[-1][0])
            return len(take)

    def caught_up(self, log_max_id: Callable[[], int]) -> bool:
        """After a catch-up: clear `behind` when the cursor has reached the scan log's newest
        id, read by `log_max_id()` while this transaction holds the outbox, so a scan the
        listener was refused in between is never skipped. Returns whether the outbox is
        caught up."""
        with self._write() as db:
            if self._get(db, "scan_cursor") >= log_max_id():
                self._set(db, "behind", 0)
                return True
            self._set(db, "behind", 1)
            return False

    def mark_behind(self) -> None:
        """The listener's scans wait until a catch-up from the scan log has run (at start:
        scans may have been recorded while the agent was away)."""
        with self._write() as db:
            self._set(db, "behind", 1)

    def add_telemetry(self, sample: dict) -> bool:
        """Add a telemetry sample, dropping the oldest telemetry when full; a full outbox with
        no telemetry left to drop drops this sample (counted too). Returns whether it was
        kept."""
        with self._write() as db:
            if self._make_room(db, 1) < 1:
                self._set(db, "dropped_telemetry", self._get(db, "dropped_telemetry") + 1)
                return False
            self._insert(db, "telemetry", [sample])
            return True

    def add_ack(self, command_id: str | None, ack: dict) -> int:
        """Queue a command's ack and remember the command as done (same transaction); returns
        the ack's seq."""
        with self._write() as db:
            self._make_room(db, 1)
            (seq,) = self._insert(db, "ack", [ack])
            if command_id:
                db.execute("INSERT INTO commands (id, ack, seq) VALUES (?, ?, ?) "
                           "ON CONFLICT (id) DO NOTHING", (command_id, json.dumps(ack), seq))
                # remember the last 1,000 commands: enough to recognise a redelivery
                db.execute("DELETE FROM commands WHERE seq <= ?", (seq - 1000,))
            return seq

    def done_command(self, command_id: str) -> dict | None:
        """The ack of a command already carried out, or None."""
        row = self._db().execute("SELECT ack FROM commands WHERE id = ?",
                                 (command_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    # --- sending -------------------------------------------------------------------------------

    def pending(self, kind: str, limit: int, skip: set[int] | frozenset[int] = frozenset()
                ) -> list[Row]:
        """The oldest `limit` rows of `kind` not in `skip` (those already in flight)."""
        rows = self._db().execute(
            "SELECT id, seq, event FROM outbox WHERE kind = ? ORDER BY id LIMIT ?",
            (kind, limit + len(skip))).fetchall()
        kept = [r for r in rows if r[0] not in skip][:limit]
        return [Row(i, kind, s, json.loads(e)) for i, s, e in kept]

    def delete(self, ids: Iterable[int]) -> None:
        """The broker has these: forget them."""
        ids = list(ids)
        with self._write() as db:
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    # --- reporting -----------------------------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Scans are waiting in the scan log (the outbox was full, or the agent just
        started): the agent catches up from there."""
        return bool(self._get(self._db(), "behind"))

    @property
    def cursor(self) -> int:
        """The newest scan-log id taken into the outbox."""
        return self._get(self._db(), "scan_cursor")

    def stats(self, db: sqlite3.Connection | None = None) -> dict:
        """Pending rows per kind and the counters; `db`: a connection of the caller's own
        (another thread's read-only one, see Agent.sync_state)."""
        db = db or self._db()
        counts = dict(db.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall())
        return {"pending_scans": counts.get("scan", 0),
                "pending_telemetry": counts.get("telemetry", 0),
                "pending_acks": counts.get("ack", 0), "max_rows": self.max_rows,
                "dropped_telemetry": self._get(db, "dropped_telemetry"),
                "scan_seq": self._get(db, "scan_seq"), "scan_cursor": self._get(db, "scan_cursor"),
                "behind": bool(self._get(db, "behind"))}

    def __len__(self) -> int:
        return self._count(self._db())


class _Transaction:
    """`with` block: BEGIN IMMEDIATE … COMMIT (ROLLBACK on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
