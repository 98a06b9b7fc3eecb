"""The kiosk's record of every scan, in SQLite, durable the moment it is written.

One row per recognition: when, which product (none for an unknown item), how sure, the
runners-up, how long it took and in which mode (a shopper's scan, a staff inventory count, a
photo upload) and session. The database runs in WAL mode with synchronous=FULL: a row whose
insert returned is on disk, so a power cut right after a scan does not lose it. The fleet
agent and the staff pages read this table; only the kiosk writes it.

    >>> log = ScanLog("scans.db")
    >>> row = log.record(result, latency_ms=12.5, mode="shopper")
    >>> log.recent(1)[0]["sku"]
    'PLT-001'
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from device.pipeline import ScanResult

MODES = ("shopper", "inventory", "upload")


def timestamp() -> str:
    """UTC with milliseconds: two scans a few hundred ms apart stay in order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ScanLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # built on one thread, used on another (the kiosk loop's); never by two at once
        self.db = sqlite_utils.Database(sqlite3.connect(self.path, check_same_thread=False))
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")  # readers (UI, sync) never fail a scan
        self.db["scans"].create(
            {"id": int, "time": str, "sku": str, "name": str, "confidence": float,
             "similarity": float, "unknown": int, "alternatives": str, "latency_ms": float,
             "timings": str, "mode": str, "session": str, "source": str, "model": str,
             "catalog_version": int},
            pk="id", not_null={"time", "mode"}, if_not_exists=True)
        self.db["scans"].create_index(["time"], if_not_exists=True)
        # "Not this one?": the product a person said a scan really was, kept for retraining
        self.db["corrections"].create(
            {"scan_id": int, "sku": str, "time": str}, pk="scan_id",
            foreign_keys=[("scan_id", "scans", "id")], if_not_exists=True)

    def record(self, result: ScanResult, latency_ms: float, mode: str = "shopper",
               session: str | None = None, model: str = "", catalog_version: int = 0) -> dict:
        """Write one scan and commit it; returns the row as stored (with its id)."""
        if mode not in MODES:
            raise ValueError(f"scan mode {mode!r} is not one of {', '.join(MODES)}")
        row = {
            "time": timestamp(), "sku": result.sku, "name": result.name,
            "confidence": result.confidence, "similarity": result.similarity,
            "unknown": int(result.unknown),
            "alternatives": json.dumps([{"sku": m.sku, "confidence": round(m.confidence, 4)}
                                        for m in result.alternatives]),
            "latency_ms": round(latency_ms, 3),
            "timings": json.dumps({k: round(v, 3) for k, v in result.timings_ms.items()}),
            "mode": mode, "session": session, "source": result.source, "model": model,
            "catalog_version": catalog_version,
        }
        with self.db.conn:  # one committed transaction per scan
            row["id"] = self.db["scans"].insert(row).last_pk
        return row

    def correct(self, scan_id: int, sku: str) -> dict:
        """Record that scan `scan_id` was really product `sku` (a later correction replaces an
        earlier one); raises KeyError for a scan that does not exist."""
        if not self.db["scans"].count_where("id = ?", [scan_id]):
            raise KeyError(f"no scan {scan_id}")
        row = {"scan_id": scan_id, "sku": sku, "time": timestamp()}
        with self.db.conn:
            self.db["corrections"].upsert(row, pk="scan_id")
        return row

    def corrections(self) -> list[dict]:
        """Every correction with what the kiosk had said: the retraining list."""
        return list(self.db.query(
            "select c.scan_id, s.time as scanned, s.sku as recognised, c.sku as actual, "
            "s.source from corrections c join scans s on s.id = c.scan_id order by c.scan_id"))

    def __len__(self) -> int:
        return self.db["scans"].count

    def recent(self, limit: int = 20) -> list[dict]:
        """The newest scans first."""
        return list(self.db["scans"].rows_where(order_by="id desc", limit=limit))

    def ids(self) -> set[int]:
        return {r[0] for r in self.db.execute("select id from scans").fetchall()}

    def close(self) -> None:
        self.db.close()
