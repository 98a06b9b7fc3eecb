"""Stock counts: inventory sessions and their per-product counts, in the scan log's SQLite file.

Staff start a session; while it is open the kiosk scans in inventory mode and every recognised
scan of the session adds one to its product (`count_scan`, called by a kiosk listener), staff
correct counts by hand (`adjust`), import what the books say (`import_expected`, a CSV of
`sku,expected`) and compare: the discrepancy is counted minus expected. Sessions and counts are
plain tables beside `scans` (same WAL file, `synchronous=FULL`), so they survive a restart and
a power cut like the scans do. One session is open at a time: the kiosk has one mode.

    >>> inv = Inventory("scans.db")
    >>> s = inv.start("Friday stock take")
    >>> inv.adjust(s["id"], "PLT-001", +1)
    1
    >>> inv.close(s["id"])
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import sqlite_utils

from device.catalog import SKU_PATTERN
from device.scans import timestamp

MAX_NAME = 80
MAX_EXPECTED = 1_000_000


class InventoryError(ValueError):
    """A request the inventory cannot carry out; str() is one line for the user."""


class InventoryConflict(InventoryError):
    """Not in the session's current state: another session is open, this one is closed."""


class Inventory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.path)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        if not self.db["inventory_counts"].exists():
            with self.db.conn:
                self.db["inventory_sessions"].create(
                    {"id": int, "name": str, "started": str, "closed": str},
                    pk="id", not_null={"name", "started"}, if_not_exists=True)
                self.db["inventory_counts"].create(
                    {"session": int, "sku": str, "counted": int, "expected": int},
                    pk=("session", "sku"), not_null={"counted"},
                    foreign_keys=[("session", "inventory_sessions", "id")], if_not_exists=True)

    # --- sessions ------------------------------------------------------------------------------

    def start(self, name: str) -> dict:
        """Open a new session; refused while another one is open."""
        name = " ".join(name.split())[:MAX_NAME]
        if not name:
            raise InventoryError("give the inventory session a name")
        with self.db.conn:  # the check and the insert in one transaction
            self.db.execute("BEGIN IMMEDIATE")
            current = self.open_session()
            if current is not None:
                raise InventoryConflict(f"inventory session {current['name']!r} is still open: "
                                     "close it first")
            sid = self.db["inventory_sessions"].insert(
                {"name": name, "started": timestamp(), "closed": None}).last_pk
        return self.session(sid)

    def open_session(self) -> dict | None:
        rows = list(self.db["inventory_sessions"].rows_where("closed is null",
                                                            order_by="id desc", limit=1))
        return self._with_totals(rows[0]) if rows else None

    def session(self, session_id: int) -> dict | None:
        rows = list(self.db["inventory_sessions"].rows_where("id = ?", [session_id]))
        return self._with_totals(rows[0]) if rows else None

    def sessions(self, limit: int = 50) -> list[dict]:
        """The newest sessions first, with their totals."""
        return [self._with_totals(r) for r in
                self.db["inventory_sessions"].rows_where(order_by="id desc", limit=limit)]

    def _with_totals(self, row: dict) -> dict:
        counted, expected, products, off = self.db.execute(
            "select coalesce(sum(counted), 0), sum(expected), count(*), "
            "coalesce(sum(counted != coalesce(expected, 0)), 0) "
            "from inventory_counts where session = ?", [row["id"]]).fetchone()
        return {**row, "open": row["closed"] is None, "counted": counted,
                "expected": expected, "products": products, "discrepancies": off}

    def close(self, session_id: int) -> dict:
        self._require_open(session_id)
        with self.db.conn:
            self.db["inventory_sessions"].update(session_id, {"closed": timestamp()})
        return self.session(session_id)

    def _require_open(self, session_id: int) -> dict:
        session = self.session(session_id)
        if session is None:
            raise KeyError(f"no inventory session {session_id}")
        if not session["open"]:
            raise InventoryConflict(f"inventory session {session['name']!r} is closed")
        return session

    # --- counts --------------------------------------------------------------------------------

    def adjust(self, session_id: int, sku: str, delta: int) -> int:
        """Add `delta` (negative to take off) to a product's count, never below zero; returns
        the new count."""
        if not SKU_PATTERN.fullmatch(sku or ""):
            raise InventoryError(f"SKU {sku!r} is not a valid SKU")
        self._require_open(session_id)
        with self.db.conn:
            self.db.execute(
                "insert into inventory_counts (session, sku, counted) values (?, ?, max(?, 0)) "
                "on conflict (session, sku) do update set counted = max(counted + ?, 0)",
                [session_id, sku, delta, delta])
        return self.db.execute("select counted from inventory_counts where session = ? and "
                               "sku = ?", [session_id, sku]).fetchone()[0]

    def count_scan(self, mode: str, session: str | None, sku: str | None) -> int | None:
        """A kiosk scan: one more of `sku` when it was an inventory scan of the open session;
        returns the new count, or None when the scan does not count (another mode, an unknown
        product, no such open session)."""
        if mode != "inventory" or not sku or session is None or not str(session).isdecimal():
            return None
        current = self.open_session()
        if current is None or current["id"] != int(session):
            return None
        return self.adjust(current["id"], sku, 1)

    def import_expected(self, session_id: int, rows: list[tuple[str, int]]) -> int:
        """Set expected counts (a product listed again replaces its earlier figure); returns
        how many products were set."""
        self._require_open(session_id)
        with self.db.conn:
            for sku, expected in rows:
                self.db.execute(
                    "insert into inventory_counts (session, sku, counted, expected) "
                    "values (?, ?, 0, ?) on conflict (session, sku) do update set expected = ?",
                    [session_id, sku, expected, expected])
        return len({sku for sku, _ in rows})

    def counts(self, session_id: int) -> list[dict]:
        """Every product of the session: counted, expected (None: not in the import) and the
        difference counted - expected (expected None counts as 0), largest discrepancy first."""
        rows = self.db.execute(
            "select sku, counted, expected from inventory_counts where session = ? order by sku",
            [session_id]).fetchall()
        out = [{"sku": sku, "counted": counted, "expected": expected,
                "difference": counted - (expected or 0)} for sku, counted, expected in rows]
        return sorted(out, key=lambda r: -abs(r["difference"]))

    def export_csv(self, session_id: int, names: dict[str, str] | None = None) -> str:
        """sku,name,expected,counted,difference; text cells that a spreadsheet would take for a
        formula are quoted with a leading apostrophe."""
        names = names or {}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["sku", "name", "expected", "counted", "difference"])
        for r in sorted(self.counts(session_id), key=lambda r: r["sku"]):
            writer.writerow([_cell(r["sku"]), _cell(names.get(r["sku"], "")),
                             "" if r["expected"] is None else r["expected"], r["counted"],
                             r["difference"]])
        return out.getvalue()

    def close_db(self) -> None:
        self.db.close()


def _cell(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def parse_expected_csv(text: str) -> list[tuple[str, int]]:
    """`sku,expected` lines (a header line is optional, extra columns are ignored); raises
    InventoryError naming the first bad line."""
    rows = []
    for n, fields in enumerate(csv.reader(io.StringIO(text.lstrip("\ufeff"))), 1):
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if n == 1 and len(fields) >= 2 and fields[0].casefold() == "sku":
            continue  # header
        if len(fields) < 2:
            raise InventoryError(f"line {n}: expected 'sku,expected', got {','.join(fields)!r}")
        sku, expected = fields[0], fields[1]
        if not SKU_PATTERN.fullmatch(sku):
            raise InventoryError(f"line {n}: {sku[:40]!r} is not a valid SKU")
        if not expected.isdecimal() or int(expected) > MAX_EXPECTED:
            raise InventoryError(f"line {n}: expected count {expected[:20]!r} is not a whole "
                                 f"number from 0 to {MAX_EXPECTED}")
        rows.append((sku, int(expected)))
    if not rows:
        raise InventoryError("the CSV has no 'sku,expected' lines")
    return rows
