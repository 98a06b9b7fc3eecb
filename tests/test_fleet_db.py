"""The fleet database (fleet/db.py) on SQLite and on the local PostgreSQL, and the
`storyscan fleet status` / `fleet stats` commands on it."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from fleet.db import FleetDB
from tests.conftest import storyscan

# a database per test is created and dropped through this server (trust auth on this machine)
PG_URL = os.environ.get("STORYSCAN_TEST_PG", "postgresql://127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed: "
                                                    "pip install 'storyscan[fleet]'")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {str(e).strip().splitlines()[0]}")
    name = f"storyscan_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("pg_url")


def scans_message(device: str, seqs: range | list[int], day: str = "2026-03-01",
                  skus: tuple[str, ...] = ("VASE-1", "PLATE-2", None)) -> dict:
    return {"v": 1, "device": device, "kind": "scan", "events": [
        {"seq": s, "scan_id": s, "time": f"{day}T10:00:{s % 60:02d}.000Z",
         "sku": skus[s % len(skus)], "name": skus[s % len(skus)] or "",
         "confidence": 0.9, "similarity": 0.8, "unknown": skus[s % len(skus)] is None,
         "latency_ms": 40.0 + s, "mode": "shopper", "session": None, "source": "v4l2:0",
         "model": "demo@1#abc", "catalog_version": 3} for s in seqs]}


def online(device: str, group: str = "g1", model: str = "demo@1#abc", catalog: int = 3) -> dict:
    return {"state": "online", "device": device, "fleet": "acme", "group": group,
            "time": "2026-03-01T09:00:00.000Z", "model": model, "catalog_version": catalog,
            "software": "0.1.0", "outbox": {"dropped_telemetry": 0}}


def test_ingest_is_idempotent(db_url: str) -> None:
    db = FleetDB(db_url)
    assert db.ingest("acme", "k1", "scans", scans_message("k1", range(1, 101))) == 100
    # the same message again (a resend after a lost PUBACK), and one that overlaps it
    assert db.ingest("acme", "k1", "scans", scans_message("k1", range(1, 101))) == 0
    assert db.ingest("acme", "k1", "scans", scans_message("k1", range(51, 151))) == 50
    # the same seq from another device (or another fleet) is another event
    assert db.ingest("acme", "k2", "scans", scans_message("k2", range(1, 11))) == 10
    assert db.ingest("other", "k1", "scans", scans_message("k1", range(1, 11))) == 10
    assert db.count("scans", "acme", "k1") == 150 and db.count("scans") == 170
    assert [r["seq"] for r in db.scans("acme", "k1")] == list(range(1, 151))
    tel = {"events": [{"seq": 1, "time": "2026-03-01T10:00:00Z", "system": {"cpu": 3}}]}
    assert db.ingest("acme", "k1", "telemetry", tel) == 1
    assert db.ingest("acme", "k1", "telemetry", tel) == 0
    ack = {"events": [{"seq": 1, "id": "c1", "command": "ping", "ok": True, "message": "pong"}]}
    assert db.ingest("acme", "k1", "ack", ack) == 1 and db.ingest("acme", "k1", "ack", ack) == 0
    assert db.count("telemetry") == 1 and [a["command_id"] for a in db.acks("c1")] == ["c1"]
    db.close()
    # a second controller (or a restart) on the same database sees the same
    again = FleetDB(db_url)
    assert again.ingest("acme", "k1", "scans", scans_message("k1", range(1, 151))) == 0
    assert again.count("scans") == 170
    again.close()


def test_status_follows_birth_will_and_silence(db_url: str) -> None:
    db = FleetDB(db_url)
    db.ingest("acme", "k1", "status", online("k1"))
    db.ingest("acme", "k2", "status", online("k2", "g2", "demo@2#def", 5))
    db.ingest("acme", "k1", "scans", scans_message("k1", [1, 2, 4]))  # seq 3 not here yet
    db.ingest("acme", "k1", "telemetry", {"events": [{"seq": 1, "system": {"cpu_percent": 12},
                                                      "kiosk": {"fps": 14.5},
                                                      "outbox": {"dropped_telemetry": 7}}]})
    # k2's will: offline, versions kept from its birth message
    db.ingest("acme", "k2", "status", {"state": "offline", "device": "k2",
                                        "reason": "connection lost"})
    rows = {r["device"]: r for r in db.status("acme")}
    assert rows["k1"]["state"] == "online" and rows["k1"]["scans"] == 3
    assert rows["k1"]["missing"] == 1 and rows["k1"]["dropped_telemetry"] == 7
    assert rows["k1"]["cpu_percent"] == 12 and rows["k1"]["fps"] == 14.5
    assert rows["k2"]["state"] == "offline" and rows["k2"]["reason"] == "connection lost"
    assert (rows["k2"]["model"], rows["k2"]["catalog"], rows["k2"]["group"]) == \
        ("demo@2#def", 5, "g2")
    assert rows["k1"]["last_seen"] and rows["k2"]["last_seen"]
    # an online device silent for longer than --stale
    assert {r["device"]: r["state"] for r in db.status("acme", stale_s=0)}["k1"] == "stale"
    # a retained status delivered when the controller subscribes does not count as "seen"
    db.ingest("acme", "k3", "status", online("k3"), retained=True)
    assert {r["device"]: r for r in db.status()}["k3"]["last_seen"] is None
    db.close()


def test_stats_per_product_device_day(db_url: str) -> None:
    db = FleetDB(db_url)
    db.ingest("acme", "k1", "scans", scans_message("k1", range(1, 7), "2026-03-01"))
    db.ingest("acme", "k1", "scans", scans_message("k1", range(7, 10), "2026-03-02"))
    db.ingest("acme", "k2", "scans", scans_message("k2", range(1, 4), "2026-03-02"))
    rows = db.stats(["day", "device", "product"], "acme")
    assert {(r["day"], r["device"], r["product"]): r["scans"] for r in rows} == {
        ("2026-03-01", "k1", "(unknown)"): 2, ("2026-03-01", "k1", "PLATE-2"): 2,
        ("2026-03-01", "k1", "VASE-1"): 2, ("2026-03-02", "k1", "(unknown)"): 1,
        ("2026-03-02", "k1", "PLATE-2"): 1, ("2026-03-02", "k1", "VASE-1"): 1,
        ("2026-03-02", "k2", "(unknown)"): 1, ("2026-03-02", "k2", "PLATE-2"): 1,
        ("2026-03-02", "k2", "VASE-1"): 1}
    assert {r["product"]: (r["scans"], r["unknown"]) for r in db.stats(["product"])} == {
        "(unknown)": (4, 4), "PLATE-2": (4, 0), "VASE-1": (4, 0)}
    assert [(r["day"], r["scans"]) for r in db.stats(["day"], since="2026-03-02")] == \
        [("2026-03-02", 6)]
    assert [(r["device"], r["scans"]) for r in db.stats(["device"], until="2026-03-01")] == \
        [("k1", 6)]
    with pytest.raises(ValueError):
        db.stats(["colour"])
    db.close()


def test_fleet_status_and_stats_commands(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    db = FleetDB(path)
    db.ingest("acme", "k1", "status", online("k1"))
    db.ingest("acme", "k2", "status", online("k2", "g2", "demo@2#def", 5))
    db.ingest("acme", "k2", "status", {"state": "offline", "device": "k2", "reason": "stopped"})
    db.ingest("acme", "k1", "scans", scans_message("k1", range(1, 7), "2026-03-01"))
    db.ingest("acme", "k2", "scans", scans_message("k2", range(1, 4), "2026-03-02"))
    db.close()

    r = storyscan("fleet", "status", "--db", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["device", "group", "state", "since", "last_seen"]
    k1 = next(ln for ln in lines if ln.startswith("k1"))
    k2 = next(ln for ln in lines if ln.startswith("k2"))
    assert "online" in k1 and "demo@1#abc" in k1 and "g1" in k1
    assert "offline" in k2 and "demo@2#def" in k2
    assert lines[-1] == "2 devices: 1 online, 1 not"
    r = storyscan("fleet", "status", "--db", path, "--json")
    assert {d["device"]: d["scans"] for d in json.loads(r.stdout)["devices"]} == {"k1": 6,
                                                                                   "k2": 3}

    r = storyscan("fleet", "stats", "--db", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["day", "device", "product", "name", "scans",
                                                "unknown"]
    assert r.stdout.splitlines()[-1] == "9 scans"
    r = storyscan("fleet", "stats", "--db", path, "--by", "product", "--csv", "-")
    assert list(csv.DictReader(io.StringIO(r.stdout))) == [
        {"product": "(unknown)", "name": "", "scans": "3", "unknown": "3"},
        {"product": "PLATE-2", "name": "PLATE-2", "scans": "3", "unknown": "0"},
        {"product": "VASE-1", "name": "VASE-1", "scans": "3", "unknown": "0"}]
    out = tmp_path / "stats.csv"
    r = storyscan("fleet", "stats", "--db", path, "--by", "day,device", "--csv", out)
    assert r.returncode == 0 and "2 rows written" in r.stdout
    assert out.read_text().splitlines() == ["day,device,scans,unknown",
                                            "2026-03-01,k1,6,2", "2026-03-02,k2,3,1"]
    r = storyscan("fleet", "stats", "--db", path, "--by", "week")
    assert r.returncode == 1 and "choose from day, device, product" in r.stderr


def test_postgres_without_a_server_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    r = storyscan("fleet", "status", "--db", "postgresql://127.0.0.1:1/nothing")
    assert r.returncode == 1 and r.stderr.startswith("storyscan: error: cannot connect")
    assert "Traceback" not in r.stderr
