"""The fleet agent's outbox (device/outbox.py) on its own: sequences, the bound, the scan-log
cursor, commands remembered; no broker."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from device.outbox import Outbox
from device.sync import SETTABLE, ConfigError, DeviceConfig, _redact


def scan(i: int) -> tuple[int, dict]:
    return i, {"scan_id": i, "sku": f"SKU{i % 3}"}


def test_seq_is_monotonic_and_survives_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert box.add_scans([scan(1), scan(2)]) == 2
    box.add_telemetry({"cpu": 1})
    rows = box.pending("scan", 10)
    assert [r.seq for r in rows] == [1, 2]
    box.delete(r.id for r in rows)
    box.close()
    box = Outbox(tmp_path / "outbox.db")  # a restart: nothing pending, sequences go on
    assert box.pending("scan", 10) == []
    box.add_scans([scan(3)])
    assert [r.seq for r in box.pending("scan", 10)] == [3]
    assert [r.seq for r in box.pending("telemetry", 10)] == [1]
    box.add_telemetry({"cpu": 2})
    assert [r.seq for r in box.pending("telemetry", 10)] == [1, 2]
    # the file itself: WAL, and every row committed
    db = sqlite3.connect(tmp_path / "outbox.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3


def test_a_scan_is_taken_once_by_id(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert box.add_scans([scan(1), scan(2), scan(3)]) == 3
    assert box.add_scans([scan(2), scan(3)]) == 0  # the listener and the catch-up overlap
    assert box.add_scans([scan(3), scan(4)], from_log=True) == 1
    assert [r.event["scan_id"] for r in box.pending("scan", 10)] == [1, 2, 3, 4]
    assert box.cursor == 4
    assert len({r.seq for r in box.pending("scan", 10)}) == 4


def test_the_bound_drops_the_oldest_telemetry_first_and_never_a_scan(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_rows=10)
    for t in range(6):
        box.add_telemetry({"t": t})
    assert box.add_scans([scan(i) for i in range(1, 7)], from_log=True) == 6
    stats = box.stats()
    # 12 rows wanted, 10 fit: the two oldest telemetry samples went
    assert stats["pending_scans"] == 6 and stats["pending_telemetry"] == 4
    assert stats["dropped_telemetry"] == 2
    assert [r.event["t"] for r in box.pending("telemetry", 10)] == [2, 3, 4, 5]
    # more scans than room: telemetry goes, then scans are refused (they wait in the scan log)
    assert box.add_scans([scan(i) for i in range(7, 14)], from_log=True) == 4
    stats = box.stats()
    assert stats["pending_scans"] == 10 and stats["pending_telemetry"] == 0
    assert stats["dropped_telemetry"] == 6 and stats["behind"] and box.cursor == 10
    # the listener waits for the catch-up while behind, so no scan is skipped
    assert box.add_scans([scan(14)]) == 0 and box.cursor == 10
    # a sample with no telemetry left to drop is itself dropped, and counted
    assert not box.add_telemetry({"t": 99})
    assert box.stats()["dropped_telemetry"] == 7
    # acks are never dropped (they may overshoot the bound)
    box.add_ack("c1", {"id": "c1", "ok": True})
    assert box.stats()["pending_acks"] == 1 and box.stats()["pending_scans"] == 10
    # room again: the catch-up goes on from the cursor and clears `behind` at the log's end
    box.delete(r.id for r in box.pending("scan", 10))
    assert box.add_scans([scan(i) for i in range(11, 15)], from_log=True) == 4
    assert not box.caught_up(lambda: 15)
    assert box.add_scans([scan(15)], from_log=True) == 1
    assert box.caught_up(lambda: 15) and not box.stats()["behind"]
    assert box.add_scans([scan(16)]) == 1  # the listener's fast path again
    assert [r.seq for r in box.pending("scan", 10)] == list(range(11, 17))


def test_pending_skips_what_is_in_flight(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.add_scans([scan(i) for i in range(1, 8)])
    first = box.pending("scan", 3)
    second = box.pending("scan", 3, skip={r.id for r in first})
    assert [r.seq for r in first] == [1, 2, 3] and [r.seq for r in second] == [4, 5, 6]


def test_threads_each_use_their_own_connection(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    errors = []

    def listener(start: int) -> None:
        try:
            for i in range(start, start + 200):
                box.add_scans([scan(i)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=listener, args=(1,))
    t.start()
    for _ in range(50):
        box.add_telemetry({"x": 1})
    t.join()
    assert not errors
    assert box.stats()["pending_scans"] == 200 and box.stats()["pending_telemetry"] == 50


def test_a_command_is_remembered_with_its_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert box.done_command("c1") is None
    box.add_ack("c1", {"id": "c1", "ok": True, "message": "pong"})
    assert box.done_command("c1") == {"id": "c1", "ok": True, "message": "pong"}


def test_set_config_is_checked_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    path.write_text(json.dumps({"device": "k1", "fleet": "acme", "group": "g1",
                                "broker": {"host": "localhost", "port": 1883}}))
    config = DeviceConfig.load(path)
    assert config.set("agent.telemetry_every_s", 15) == 15.0
    assert json.loads(path.read_text())["agent"]["telemetry_every_s"] == 15.0
    assert (path.stat().st_mode & 0o777) == 0o600
    assert DeviceConfig.load(path).agent["telemetry_every_s"] == 15.0
    for key, value in (("broker.host", "evil.example"), ("device", "k2"),
                       ("agent.batch", 0), ("agent.batch", 2.5), ("agent.window", "x")):
        with pytest.raises(ConfigError):
            config.set(key, value)
    assert json.loads(path.read_text())["broker"]["host"] == "localhost"
    assert "agent.batch" in SETTABLE


def test_bad_names_and_configs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    for data in ({"device": "k/1", "fleet": "acme", "group": "g"},
                 {"device": "groups", "fleet": "acme", "group": "g"},
                 {"device": "k1", "fleet": "a+b", "group": "g"},
                 {"device": "k1", "fleet": "acme"}):
        path.write_text(json.dumps({**data, "broker": {"host": "h"}}))
        with pytest.raises(ConfigError):
            DeviceConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        DeviceConfig.load(path)


def test_camera_passwords_stay_on_the_device() -> None:
    assert _redact("rtsp://admin:secret@10.0.0.5:554/stream") == \
        "rtsp://admin:***@10.0.0.5:554/stream"
    assert _redact("v4l2:0") == "v4l2:0"
