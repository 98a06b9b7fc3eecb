"""The fleet over a real broker: a private `mosquitto -c <generated conf>` on free ports, with
the password file, ACL and TLS files `storyscan provision` wrote, and its own persistence
folder so that a restart keeps the controller's queued messages (as a production broker does).

Device agents run as `storyscan agent` processes (SIGKILLed in one test) or on a thread here;
the controller runs on a thread here, into SQLite or the local PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from device.outbox import Outbox
from device.sync import Agent, BrokerSettings, DeviceConfig, device_topic, group_topic
from fleet.controller import Controller, send_command
from fleet.db import FleetDB
from provisioning.provision import (
    Provisioned,
    broker_config,
    provision_controller,
    provision_device,
)
from tests.conftest import ROOT, TrainedDemo, copy_catalog, storyscan
from tests.test_fleet_db import pg_url  # noqa: F401 (a fixture)

FLEET = "acme"
DEVICES = ("k1", "k2", "k3", "k4", "k5", "k6")
FAST_AGENT = {"telemetry_every_s": 1.0, "poll_s": 0.1, "reconnect_min_s": 0.1,
              "reconnect_max_s": 0.5, "retry_refused_s": 0.5}


# --- the broker --------------------------------------------------------------------------------


def mosquitto() -> str:
    """The mosquitto binary; Debian's package is installed when it is missing and we can."""
    def find() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
             if os.access(p, os.X_OK)), None)

    exe = find()
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "mosquitto"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        exe = find()
    if exe is None:
        pytest.skip("mosquitto is not installed and could not be installed "
                    "(apt-get install mosquitto, as root)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A private mosquitto: a plain listener (passwords and ACLs) and a TLS one (client
    certificates required too), configured by provisioning's broker_config."""

    def __init__(self, exe: str, broker_dir: Path, work: Path) -> None:
        self.exe, self.work = exe, work
        self.port, self.tls_port = free_port(), free_port()
        (work / "persist").mkdir(parents=True, exist_ok=True)
        conf = broker_config(self.tls_port, etc=broker_dir, tls=True,
                             persistence_dir=work / "persist", fleet=FLEET, bind="127.0.0.1")
        conf += f"listener {self.port} 127.0.0.1\n"
        conf += f"log_dest file {work / 'mosquitto.log'}\n"
        if os.geteuid() == 0:
            conf += "user root\n"  # else mosquitto drops to 'mosquitto', who cannot read tmp
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)
        pytest.fail("mosquitto did not open its port in 10 s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def log(self) -> str:
        path = self.work / "mosquitto.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@dataclass
class Fleet:
    out: Path
    devices: dict[str, Provisioned]
    controller: Provisioned


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Six kiosks of group g1 (k5: group g2) and the controller, as `storyscan provision`
    makes them; the broker's certificate names 127.0.0.1."""
    out = tmp_path_factory.mktemp("provisioned")
    devices = {d: provision_device(d, FLEET, "g2" if d == "k5" else "g1", out,
                                   "127.0.0.1:8883", out / "ca") for d in DEVICES}
    ops = provision_controller("ops", FLEET, out, "127.0.0.1:8883", out / "ca")
    return Fleet(out, devices, ops)


@pytest.fixture
def broker(provisioned: Fleet, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(mosquitto(), provisioned.out / "broker", tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


# --- helpers -----------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             extra: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{extra()}")


def controller_settings(provisioned: Fleet, broker: Broker) -> BrokerSettings:
    data = json.loads(provisioned.controller.config.read_text())["broker"]
    return BrokerSettings.from_config({**data, "port": broker.port, "tls": None},
                                      provisioned.controller.folder)


def start_controller(provisioned: Fleet, broker: Broker, db_url: str | Path
                     ) -> Controller:
    c = Controller(controller_settings(provisioned, broker), FLEET, FleetDB(db_url),
                   name="ops", reconnect=(0.1, 0.5)).start()
    assert c.connected.wait(10), broker.log()
    return c


def device_config(provisioned: Fleet, device: str, broker: Broker, where: Path,
                  tls: bool = False, **agent: object) -> Path:
    """The provisioned folder, copied; the broker's test port; data paths under `where`."""
    folder = where / device
    shutil.copytree(provisioned.devices[device].folder, folder)
    path = folder / "device.json"
    data = json.loads(path.read_text())
    data["broker"]["port"] = broker.tls_port if tls else broker.port
    if not tls:
        data["broker"]["tls"] = None
    data["paths"] = {"scans": str(where / "scans.db"), "outbox": str(where / "outbox.db"),
                     "catalog": str(where / "catalog.db"), "bundle": str(where / "bundle")}
    data["agent"] |= FAST_AGENT | agent
    path.write_text(json.dumps(data, indent=2))
    return path


class ScanWriter:
    """Writes scans into a kiosk's scan log (the table device/scans.py creates), many per
    transaction, as a busy kiosk would over time."""

    def __init__(self, path: Path) -> None:
        from device.scans import ScanLog

        ScanLog(path).close()  # the kiosk's own schema
        self.db = sqlite3.connect(path)
        self.n = 0

    def write(self, n: int) -> None:
        rows = [(f"2026-03-01T10:{(self.n + i) // 60 % 60:02d}:{(self.n + i) % 60:02d}.000Z",
                 f"SKU-{(self.n + i) % 7}", f"product {(self.n + i) % 7}", 0.9, 0.8, 0, 35.0,
                 "shopper", "v4l2:0", "demo@1#abc", 3) for i in range(n)]
        with self.db:
            self.db.executemany(
                "INSERT INTO scans (time, sku, name, confidence, similarity, unknown, "
                "latency_ms, mode, source, model, catalog_version) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self.n += n


def agent_process(config: Path, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("storyscan")
    return subprocess.Popen([str(exe), "agent", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("a"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


class RawClient:
    """A bare MQTT 5 client with a device's or the controller's credentials, recording what
    the broker answers (CONNACK, PUBACK and SUBACK reason codes) and what it delivers."""

    def __init__(self, settings: BrokerSettings, client_id: str) -> None:
        self.settings = settings
        self.connack: Future = Future()
        self.acks: dict[tuple[str, int], Future] = {}  # ("pub" or "sub", mid)
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.c = settings.client(client_id, reconnect=(0.1, 0.5))

        def on_connect(c, userdata, flags, reason, properties) -> None:
            if not self.connack.done():
                self.connack.set_result(reason)

        def on_publish(c, userdata, mid, reason, properties) -> None:
            self._answer("pub", mid).set_result(reason)

        def on_subscribe(c, userdata, mid, reasons, properties) -> None:
            self._answer("sub", mid).set_result(reasons[0])

        self.c.on_connect, self.c.on_publish = on_connect, on_publish
        self.c.on_subscribe = on_subscribe
        self.c.on_message = lambda c, userdata, message: self.messages.append(message)

    def _answer(self, kind: str, mid: int) -> Future:
        with self._lock:
            return self.acks.setdefault((kind, mid), Future())

    def connect(self, timeout: float = 5.0):
        self.c.connect_async(self.settings.host, self.settings.port, clean_start=True)
        self.c.loop_start()
        return self.connack.result(timeout)

    def publish(self, topic: str, body: dict, timeout: float = 5.0):
        info = self.c.publish(topic, json.dumps(body), qos=1)
        return self._answer("pub", info.mid).result(timeout)

    def subscribe(self, topic: str, timeout: float = 5.0):
        _, mid = self.c.subscribe(topic, qos=1)
        return self._answer("sub", mid).result(timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def raw_client(provisioned: Fleet, broker: Broker, device: str,
               password: str | None = None, suffix: str = "raw") -> RawClient:
    data = json.loads(provisioned.devices[device].config.read_text())["broker"]
    if password is not None:
        data["password"] = password
    settings = BrokerSettings.from_config({**data, "port": broker.port, "tls": None},
                                          provisioned.devices[device].folder)
    return RawClient(settings, f"{FLEET}.{device}-{suffix}")


def scans_body(device: str, seqs: range) -> dict:
    return {"v": 1, "device": device, "kind": "scan", "events": [
        {"seq": s, "scan_id": s, "time": "2026-03-01T10:00:00.000Z", "sku": "SKU-1",
         "name": "x", "unknown": False} for s in seqs]}


# --- (a) nothing lost --------------------------------------------------------------------------


def test_ten_thousand_scans_survive_broker_restarts_and_a_sigkill(
        provisioned: Fleet, broker: Broker, tmp_path: Path) -> None:
    t0 = time.monotonic()
    fleet_db = tmp_path / "fleet.db"
    controller = start_controller(provisioned, broker, fleet_db)
    db = FleetDB(fleet_db)
    scans = ScanWriter(tmp_path / "scans.db")
    config = device_config(provisioned, "k1", broker, tmp_path)
    log = tmp_path / "agent.log"
    outbox = Outbox(tmp_path / "outbox.db")

    def stored() -> int:
        return db.count("scans", FLEET, "k1")

    def why() -> str:
        return (f"stored {stored()}, outbox {outbox.stats()}\n--- agent\n"
                f"{log.read_text()[-3000:]}\n--- broker\n{broker.log()}")

    agent = agent_process(config, log)
    try:
        scans.write(2000)
        wait_for(lambda: stored() >= 300, 30, "the first scans", why)
        broker.stop()  # outage 1, in the middle of sending
        scans.write(2000)
        wait_for(lambda: outbox.cursor >= 4000, 10, "the agent to queue scans offline", why)
        broker.start()
        wait_for(lambda: stored() >= 2500, 30, "delivery after the restart", why)
        scans.write(2000)
        wait_for(lambda: stored() >= 4100, 30, "more scans", why)
        pending_at_kill = outbox.stats()["pending_scans"]
        agent.send_signal(signal.SIGKILL)  # while it is sending
        agent.wait(timeout=10)
        killed_at = stored()
        scans.write(2000)  # the kiosk goes on while the agent is down
        agent = agent_process(config, log)
        wait_for(lambda: stored() >= 7000, 30, "delivery after the restart", why)
        broker.stop()  # outage 2
        scans.write(2000)
        time.sleep(0.3)
        broker.start()
        wait_for(lambda: stored() >= 10_000 and outbox.stats()["pending_scans"] == 0, 60,
                 "all 10,000 scans", why)
        time.sleep(0.5)  # anything resent late would show up now
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        controller.stop()
    rows = db.scans(FLEET, "k1")
    assert len(rows) == 10_000 and db.count("scans") == 10_000
    assert [r["scan_id"] for r in rows] == list(range(1, 10_001))
    assert all(r["seq"] == r["scan_id"] for r in rows)  # taken in order, each seq once
    assert rows[-1]["sku"] == f"SKU-{9999 % 7}" and rows[-1]["model"] == "demo@1#abc"
    assert killed_at < 10_000
    status = {r["device"]: r for r in db.status(FLEET)}["k1"]
    assert status["state"] == "offline" and status["reason"] == "stopped"  # SIGTERM: clean
    assert status["missing"] == 0 and db.count("telemetry", FLEET, "k1") >= 1
    seconds = time.monotonic() - t0
    print(f"10,000 scans through 2 broker restarts and a SIGKILL in {seconds:.1f} s "
          f"({controller.counters.messages} messages, {controller.counters.repeated_messages} "
          f"repeats; SIGKILL with {pending_at_kill} scans in the outbox)")
    assert seconds < 90


# --- (b) ACLs, passwords, TLS ------------------------------------------------------------------


def test_a_device_writes_only_its_own_topics(provisioned: Fleet, broker: Broker,
                                             tmp_path: Path) -> None:
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    k3 = raw_client(provisioned, broker, "k3", suffix="victim")  # listens to what it may read
    k2 = raw_client(provisioned, broker, "k2")
    try:
        assert not k3.connect().is_failure
        assert not k3.subscribe(device_topic(FLEET, "k3", "cmd")).is_failure
        assert not k3.subscribe(group_topic(FLEET, "g1", "#")).is_failure
        assert not k2.connect().is_failure
        forged = {
            device_topic(FLEET, "k3", "scans"): scans_body("k3", range(1, 6)),
            device_topic(FLEET, "k3", "status"): {"state": "online", "model": "evil"},
            device_topic(FLEET, "k3", "cmd"): {"id": "x", "command": "ping"},
            device_topic(FLEET, "k2", "cmd"): {"id": "y", "command": "ping"},  # read-only
            group_topic(FLEET, "g1", "release/model"): {"version": "666"},
            group_topic(FLEET, "g1", "release/catalog"): {"version": 666},
            "storyscan/v1/other/k2/scans": scans_body("k2", range(1, 2)),
        }
        for topic, body in forged.items():
            reason = k2.publish(topic, body)
            # MQTT 5: the broker says no in the PUBACK (0x87 not authorised), no silent drop
            assert reason.is_failure and reason.value == 0x87, (topic, reason)
        # nor may it read another device's commands: mosquitto 2.0 grants the subscription
        # but checks read access on delivery, so k3 gets the controller's command, k2 not
        k2.subscribe(device_topic(FLEET, "k3", "cmd"))
        ops = RawClient(controller_settings(provisioned, broker), f"{FLEET}.ops-test")
        assert not ops.connect().is_failure
        assert not ops.publish(device_topic(FLEET, "k3", "cmd"),
                               {"id": "z", "command": "ping"}).is_failure
        wait_for(lambda: len(k3.messages) == 1, 5, "k3's command")
        ops.close()
        # its own topics work, and the controller stores them under its name
        assert not k2.publish(device_topic(FLEET, "k2", "scans"),
                              scans_body("k2", range(1, 4))).is_failure
        wait_for(lambda: controller.db.count("scans", FLEET, "k2") == 3, 10, "k2's scans")
        time.sleep(0.3)
        assert controller.db.count("scans", FLEET, "k3") == 0
        assert [r["device"] for r in controller.db.status(FLEET)] == ["k2"]
        # no forged command or release reached anyone; only the controller's command did
        assert [json.loads(m.payload)["id"] for m in k3.messages] == ["z"]
        assert k2.messages == []
    finally:
        k2.close()
        k3.close()
        controller.stop()


def test_a_wrong_password_is_refused(provisioned: Fleet, broker: Broker) -> None:
    bad = raw_client(provisioned, broker, "k2", password="not-the-password")
    try:
        reason = bad.connect()
        # mosquitto 2.0 answers "not authorised" (0x87), later versions 0x86 (bad password)
        assert reason.is_failure and reason.value in (0x86, 0x87), reason
    finally:
        bad.close()
    # another device's password does not open this one either
    other = json.loads(provisioned.devices["k3"].config.read_text())["broker"]["password"]
    bad = raw_client(provisioned, broker, "k2", password=other, suffix="other")
    try:
        assert bad.connect().is_failure
    finally:
        bad.close()


def test_tls_with_the_provisioned_client_certificate(provisioned: Fleet, broker: Broker,
                                                     tmp_path: Path) -> None:
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    config = DeviceConfig.load(device_config(provisioned, "k6", broker, tmp_path, tls=True))
    assert config.broker.cert is not None and config.broker.port == broker.tls_port
    agent = Agent(config).start()
    try:
        wait_for(lambda: any(r["device"] == "k6" and r["state"] == "online"
                             for r in controller.db.status(FLEET)), 15, "k6 online over TLS",
                 broker.log)
        row = next(r for r in controller.db.status(FLEET) if r["device"] == "k6")
        assert row["software"] and row["group"] == "g1"
        # the right password but no client certificate: the TLS listener refuses
        data = json.loads(config.path.read_text())["broker"]
        no_cert = RawClient(BrokerSettings.from_config(
            {**data, "tls": {"ca": "ca.crt"}}, config.base), f"{FLEET}.k6-nocert")
        no_cert.c.connect_async("127.0.0.1", broker.tls_port)
        no_cert.c.loop_start()
        time.sleep(1.5)
        assert not no_cert.connack.done() or no_cert.connack.result().is_failure
        no_cert.close()
    finally:
        agent.stop()
        controller.stop()


def test_what_the_broker_refuses_stays_in_the_outbox(provisioned: Fleet, tmp_path: Path
                                                     ) -> None:
    """A broker whose ACL lacks the device's scans topic (a provisioning mistake): every scans
    message comes back with PUBACK 0x87, and the scans stay in the outbox, retried, while
    status and telemetry go through."""
    broker_dir = tmp_path / "broker-files"
    shutil.copytree(provisioned.out / "broker", broker_dir)
    acl = broker_dir / "acl"
    acl.write_text(acl.read_text().replace(
        f"topic write {device_topic(FLEET, 'k5', 'scans')}\n", ""))
    broker = Broker(mosquitto(), broker_dir, tmp_path / "broker").start()
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    scans = ScanWriter(tmp_path / "scans.db")
    config = DeviceConfig.load(device_config(provisioned, "k5", broker, tmp_path,
                                             telemetry_every_s=0.2))
    agent = Agent(config).start()
    try:
        scans.write(30)
        wait_for(lambda: agent.counters.refused >= 2, 10, "refusals")
        assert "Not authorized" in (agent.counters.last_refusal or "")
        assert Outbox(tmp_path / "outbox.db").stats()["pending_scans"] == 30
        wait_for(lambda: controller.db.count("telemetry", FLEET, "k5") >= 2, 10, "telemetry")
        assert controller.db.count("scans") == 0
        assert controller.db.status(FLEET)[0]["state"] == "online"
    finally:
        agent.stop()
        controller.stop()
        broker.stop()


# --- (c) the controller stores each event once -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_controller_ingest_is_idempotent(backend: str, provisioned: Fleet,
                                         broker: Broker, tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "fleet.db") if backend == "sqlite" else request.getfixturevalue(
        "pg_url")
    controller = start_controller(provisioned, broker, url)
    k4 = raw_client(provisioned, broker, "k4")
    try:
        assert not k4.connect().is_failure
        topic = device_topic(FLEET, "k4", "scans")
        k4.publish(topic, scans_body("k4", range(1, 101)))
        k4.publish(topic, scans_body("k4", range(1, 101)))  # a resend
        k4.publish(topic, scans_body("k4", range(51, 151)))  # overlapping
        wait_for(lambda: controller.db.count("scans", FLEET, "k4") == 150, 10, "150 scans")
        # the controller away: the broker keeps its queue (persistent session) ...
        controller.stop()
        k4.publish(topic, scans_body("k4", range(101, 201)))
        k4.publish(topic, scans_body("k4", range(1, 201)))
        controller = start_controller(provisioned, broker, url)
        wait_for(lambda: controller.db.count("scans", FLEET, "k4") == 200, 10, "200 scans")
        time.sleep(0.3)
        assert controller.db.count("scans", FLEET, "k4") == 200
        assert [r["seq"] for r in controller.db.scans(FLEET, "k4")] == list(range(1, 201))
        assert controller.counters.repeated_messages >= 0
    finally:
        k4.close()
        controller.stop()
        controller.db.close()


# --- (e) the bound, reported -------------------------------------------------------------------


def test_a_full_outbox_drops_telemetry_first_and_reports_it(
        provisioned: Fleet, broker: Broker, tmp_path: Path) -> None:
    broker.stop()  # the device is cut off
    scans = ScanWriter(tmp_path / "scans.db")
    config = DeviceConfig.load(device_config(provisioned, "k5", broker, tmp_path,
                                             outbox_max_rows=20, telemetry_every_s=0.05))
    agent = Agent(config).start()
    outbox = Outbox(tmp_path / "outbox.db")
    controller = None
    try:
        scans.write(15)
        wait_for(lambda: outbox.stats()["pending_scans"] == 15 and
                 outbox.stats()["dropped_telemetry"] >= 3, 10, "telemetry to overflow")
        assert outbox.stats()["pending_telemetry"] == 5
        scans.write(10)  # more than fits: telemetry goes, 5 scans wait in the scan log
        wait_for(lambda: outbox.stats()["pending_scans"] == 20, 10, "the outbox full of scans")
        stats = outbox.stats()
        assert stats["pending_telemetry"] == 0 and stats["behind"] and stats["scan_cursor"] == 20
        broker.start()
        controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
        wait_for(lambda: controller.db.count("scans", FLEET, "k5") == 25, 15, "all 25 scans")
        wait_for(lambda: (controller.db.status(FLEET) or [{}])[0].get("dropped_telemetry"),
                 10, "the drop count at the controller")
        row = controller.db.status(FLEET)[0]
        assert row["dropped_telemetry"] >= stats["dropped_telemetry"] > 0
        assert [r["scan_id"] for r in controller.db.scans(FLEET, "k5")] == list(range(1, 26))
        # the same count is in the telemetry events themselves
        last = json.loads(controller.db._rows(
            "SELECT data FROM telemetry ORDER BY seq DESC LIMIT 1")[0]["data"])
        assert last["outbox"]["dropped_telemetry"] > 0 and last["outbox"]["max_rows"] == 20
    finally:
        agent.stop()
        if controller is not None:
            controller.stop()


# --- (f) commands ------------------------------------------------------------------------------


def test_commands_are_acked(provisioned: Fleet, broker: Broker, tmp_path: Path) -> None:
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    config = DeviceConfig.load(device_config(provisioned, "k2", broker, tmp_path))
    agent = Agent(config).start()
    settings = controller_settings(provisioned, broker)
    try:
        # a brand-new device session only gets commands sent after it subscribed; its birth
        # message follows its subscriptions, so "online" at the controller means it listens
        wait_for(lambda: any(r["device"] == "k2" and r["state"] == "online"
                             for r in controller.db.status(FLEET)), 30, "k2 online")
        ack = send_command(settings, FLEET, "k2", "ping", timeout=30, client_name="ops")
        assert ack["ok"] and ack["message"] == "pong" and ack["data"]["software"]
        ack = send_command(settings, FLEET, "k2", "set-config",
                           {"key": "agent.telemetry_every_s", "value": "30"}, timeout=30,
                           client_name="ops")
        assert ack["ok"] and ack["data"] == {"key": "agent.telemetry_every_s", "value": 30.0}
        assert json.loads(config.path.read_text())["agent"]["telemetry_every_s"] == 30.0
        assert agent.config.agent["telemetry_every_s"] == 30.0  # applied at once
        ack = send_command(settings, FLEET, "k2", "set-config",
                           {"key": "broker.host", "value": "evil.example"}, timeout=30,
                           client_name="ops")
        assert not ack["ok"] and "cannot be set remotely" in ack["message"]
        assert json.loads(config.path.read_text())["broker"]["host"] == "127.0.0.1"
        ack = send_command(settings, FLEET, "k2", "reload-catalog", timeout=30,
                           client_name="ops")
        assert not ack["ok"] and ack["message"].startswith("unsupported here")
        ack = send_command(settings, FLEET, "k2", "deploy-model", timeout=30,
                           client_name="ops")
        assert not ack["ok"] and "unknown command 'deploy-model'" in ack["message"]
        # a command delivered twice (QoS 1) is carried out once and acked twice alike
        ops = RawClient(settings, f"{FLEET}.ops-test")
        assert not ops.connect().is_failure
        for _ in range(2):
            ops.publish(device_topic(FLEET, "k2", "cmd"), {"id": "same", "command": "ping"})
        wait_for(lambda: len(controller.db.acks("same")) == 2, 30, "two acks")
        first, second = controller.db.acks("same")
        assert (first["message"], first["time"]) == (second["message"], second["time"])
        ops.close()
        # every ack is in the fleet database too
        wait_for(lambda: controller.db.count("acks", FLEET, "k2") == 7, 10, "7 acks stored")
        # and from the command line, with the provisioned controller config
        ctl = tmp_path / "controller.json"
        data = json.loads(provisioned.controller.config.read_text())
        data["broker"] |= {"port": broker.port, "tls": None}
        ctl.write_text(json.dumps(data))
        r = storyscan("fleet", "command", "k2", "ping", "--config", ctl, "--timeout", "10")
        assert r.returncode == 0 and r.stdout.strip() == "k2: ok: pong", r.stderr
        r = storyscan("fleet", "command", "k2", "set-config", "agent.batch", "0", "--config",
                      ctl, "--timeout", "10")
        assert r.returncode == 1 and "k2: error:" in r.stdout
    finally:
        agent.stop()
        controller.stop()


def test_a_command_sent_while_the_device_is_away_arrives_when_it_is_back(
        provisioned: Fleet, broker: Broker, tmp_path: Path) -> None:
    config = DeviceConfig.load(device_config(provisioned, "k3", broker, tmp_path))
    agent = Agent(config).start()  # once, so the broker knows its persistent session
    wait_for(lambda: agent._connected, 10, "the agent to connect")
    time.sleep(0.5)  # its SUBSCRIBE, sent on connect, reaches the broker's session
    agent.stop()
    settings = controller_settings(provisioned, broker)
    result: list = []
    sender = threading.Thread(target=lambda: result.append(send_command(
        settings, FLEET, "k3", "ping", timeout=20, client_name="ops")))
    sender.start()
    time.sleep(1.0)
    agent = Agent(DeviceConfig.load(config.path)).start()
    try:
        sender.join(25)
        assert result and result[0]["ok"]
    finally:
        agent.stop()


# --- in the kiosk's process --------------------------------------------------------------------


@pytest.mark.slow
def test_in_process_agent_with_a_real_kiosk(provisioned: Fleet, broker: Broker,
                                            trained_demo: TrainedDemo, tmp_path: Path) -> None:
    """The kiosk's listener feeds the outbox; reload-catalog runs on the kiosk's thread."""
    from device.camera import Camera
    from device.kiosk import Kiosk
    from device.pipeline import Pipeline
    from device.scans import ScanLog
    from trainer.synthetic import plan_products, write_scan_video

    video = tmp_path / "scan.avi"
    write_scan_video(video, plan_products(12, seed=7), placements=4, width=640, height=360,
                     fps=12, seed=7, gap_s=1.0, move_s=0.5, hold_s=1.5)
    pipeline = Pipeline.open(trained_demo.bundle, copy_catalog(trained_demo, tmp_path))
    camera = Camera(f"{video}?fps=0")
    scan_log = ScanLog(tmp_path / "scans.db")
    kiosk = Kiosk(camera, pipeline, scan_log)
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    config = DeviceConfig.load(device_config(provisioned, "k4", broker, tmp_path))
    agent = Agent(config, kiosk=kiosk).start()
    settings = controller_settings(provisioned, broker)
    acks: list = []
    try:
        with camera:
            assert kiosk.run(max_scans=3, duration=120) == 3
            wait_for(lambda: controller.db.count("scans", FLEET, "k4") == 3, 15, "3 scans")
            # reload-catalog needs the kiosk's loop running: its jobs run between frames
            runner = threading.Thread(target=kiosk.run, kwargs={"duration": 30})
            runner.start()
            acks.append(send_command(settings, FLEET, "k4", "reload-catalog", timeout=20,
                                     client_name="ops"))
            kiosk.stop()
            runner.join(30)
        # the loop may have recorded another scan meanwhile: wait until it has arrived too
        wait_for(lambda: controller.db.count("scans", FLEET, "k4") == len(scan_log), 15,
                 "every recorded scan")
        stored = controller.db.scans(FLEET, "k4")
        recorded = sorted(scan_log.recent(100), key=lambda r: r["id"])
        assert [r["scan_id"] for r in stored] == [r["id"] for r in recorded]
        assert [r["sku"] for r in stored] == [r["sku"] for r in recorded]
        assert stored[0]["model"] == pipeline.bundle.key
        assert acks[0]["ok"] and acks[0]["data"]["catalog_version"] == kiosk.catalog_version
        wait_for(lambda: controller.db.count("telemetry", FLEET, "k4") >= 1, 10, "telemetry")
        status = next(r for r in controller.db.status(FLEET) if r["device"] == "k4")
        assert status["model"] == pipeline.bundle.key and status["fps"] is not None
    finally:
        agent.stop()
        controller.stop()


@pytest.mark.slow
def test_storyscan_kiosk_with_its_agent(provisioned: Fleet, broker: Broker,
                                        trained_demo: TrainedDemo, tmp_path: Path) -> None:
    """`storyscan kiosk --agent`: camera scans reach the controller from the kiosk's own
    process, on the model the device config names; a second agent on its outbox is refused;
    SIGTERM stops both, the agent saying "stopped"."""
    from device.scans import ScanLog
    from trainer.synthetic import plan_products, write_scan_video

    video = tmp_path / "scan.avi"
    write_scan_video(video, plan_products(12, seed=7), placements=3, width=640, height=360,
                     fps=12, seed=7, gap_s=1.0, move_s=0.5, hold_s=1.5)
    catalog = copy_catalog(trained_demo, tmp_path)
    config = device_config(provisioned, "k4", broker, tmp_path)
    data = json.loads(config.read_text())
    data["paths"]["bundle"] = str(trained_demo.bundle)  # no --bundle: the kiosk loads this
    config.write_text(json.dumps(data))
    exe = str(Path(sys.executable).with_name("storyscan"))
    kiosk = [exe, "kiosk", "--camera", str(video), "--catalog", str(catalog), "--scans",
             str(tmp_path / "scans.db"), "--health-every", "0"]
    bad = subprocess.run([*kiosk, "--agent", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        f"storyscan: error: {tmp_path / 'none.json'}: no such device config"]
    controller = start_controller(provisioned, broker, tmp_path / "fleet.db")
    log = tmp_path / "kiosk.log"
    proc = subprocess.Popen([*kiosk, "--agent", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: controller.db.count("scans", FLEET, "k4") >= 2, 120,
                 "2 camera scans at the controller", log.read_text)
        second = storyscan("agent", "--config", config, timeout=60)
        assert second.returncode == 1 and "another fleet agent is running" in second.stderr
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()
        def k4() -> dict:
            return next(r for r in controller.db.status(FLEET) if r["device"] == "k4")

        wait_for(lambda: k4()["state"] == "offline", 10, "k4 offline")
        status = k4()
        recorded = sorted(ScanLog(tmp_path / "scans.db").recent(100), key=lambda r: r["id"])
        stored = controller.db.scans(FLEET, "k4")
        assert [r["scan_id"] for r in stored] == [r["id"] for r in recorded[:len(stored)]]
        assert [r["sku"] for r in stored] == [r["sku"] for r in recorded[:len(stored)]]
        assert stored[0]["model"] == status["model"] == recorded[0]["model"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        controller.stop()


def test_controller_command(provisioned: Fleet, broker: Broker, tmp_path: Path) -> None:
    """`storyscan fleet controller` with the provisioned controller config; SIGTERM stops it."""
    ctl = tmp_path / "controller.json"
    data = json.loads(provisioned.controller.config.read_text())
    data["broker"] |= {"port": broker.port, "tls": None}
    ctl.write_text(json.dumps(data))
    exe = Path(sys.executable).with_name("storyscan")
    proc = subprocess.Popen([str(exe), "fleet", "controller", "--config", str(ctl), "--db",
                             str(tmp_path / "fleet.db")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    k6 = raw_client(provisioned, broker, "k6")
    try:
        assert not k6.connect().is_failure
        db = FleetDB(tmp_path / "fleet.db")

        def stored() -> int:
            k6.publish(device_topic(FLEET, "k6", "scans"), scans_body("k6", range(1, 11)))
            return db.count("scans", FLEET, "k6")

        wait_for(lambda: stored() == 10, 20, "the controller process to store k6's scans")
    finally:
        k6.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "controller stopped:" in err and "new events" in err
