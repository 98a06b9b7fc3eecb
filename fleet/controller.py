"""The controller's ingest loop: every device's status, telemetry, scans and acks into the fleet
database.

It subscribes to `storyscan/v1/<fleet>/+/{status,telemetry,scans,ack}` (four filters that never
overlap, so no message arrives twice through two of them) with QoS 1 on a persistent session
(clean start off, a long session expiry, a fixed client id): while the controller is away the
broker keeps the devices' messages for it (mosquitto: `persistence true`, and
`max_queued_messages` large enough for the outage; see provisioning/README.md). Acks are
manual: a message is acknowledged to the broker only after its events are committed, so a
crash or a lost database connection before the commit gets it redelivered, and the database
stores it once (fleet/db.py). A database error is retried with backoff without acknowledging.

The device id comes from the topic, never from the payload: the broker's ACL lets each device
write only its own topics, so the topic is what identifies it.

Staged rollouts (fleet/rollout.py) advance here: every `rollout_every_s` seconds a thread of
the controller counts each rolling rollout's acks and republishes its release message with the
next wave, or halted, through the controller's own connection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.sync import (
    DEVICE_LEAVES,
    PREFIX,
    BrokerSettings,
    connect_properties,
    device_topic,
    username,
)
from fleet import rollout
from fleet.db import FleetDB

log = logging.getLogger("storyscan.fleet")

SESSION_EXPIRY_S = 30 * 24 * 3600  # the broker keeps the controller's queue this long


@dataclass
class Counters:
    messages: int = 0
    new_events: int = 0
    repeated_messages: int = 0  # messages whose events were all stored already
    bad: int = 0  # unreadable payloads or topics (acknowledged and dropped)


class Controller:
    def __init__(self, broker: BrokerSettings, fleet: str, db: FleetDB,
                 name: str = "controller", session_expiry_s: int = SESSION_EXPIRY_S,
                 reconnect: tuple[float, float] = (1.0, 30.0),
                 rollout_every_s: float = 2.0) -> None:
        self.broker, self.fleet, self.db, self.name = broker, fleet, db, name
        self.rollout_every_s = rollout_every_s
        self._acked: dict[int, object] = {}  # mid -> PUBACK reason code
        self._puback = threading.Condition()
        self._rollouts: threading.Thread | None = None
        self.session_expiry_s = session_expiry_s
        self.counters = Counters()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.client = broker.client(username(fleet, name), manual_ack=True, reconnect=reconnect)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.filters = [device_topic(fleet, "+", leaf) for leaf in DEVICE_LEAVES]

    def start(self) -> Controller:
        self._stop.clear()
        self.client.connect_async(self.broker.host, self.broker.port,
                                  keepalive=self.broker.keepalive, clean_start=False,
                                  properties=connect_properties(self.session_expiry_s))
        self.client.loop_start()
        self._rollouts = threading.Thread(target=self._advance_rollouts_loop,
                                          name="fleet-rollouts", daemon=True)
        self._rollouts.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._rollouts is not None:
            self._rollouts.join(10)
        self.client.disconnect()
        self.client.loop_stop()

    # --- rollouts ------------------------------------------------------------------------------

    def _advance_rollouts_loop(self) -> None:
        while not self._stop.wait(self.rollout_every_s):
            if not self.connected.is_set():
                continue
            try:
                for line in rollout.advance(self.db, self.publish_retained):
                    log.info("%s", line)
            except self.db.errors as e:
                log.error("fleet database: %s; rollouts wait", e)
            except Exception:
                log.exception("advancing rollouts failed; trying again")

    def publish_retained(self, topic: str, message: dict, timeout: float = 10.0) -> bool:
        """Publish retained, QoS 1; True once the broker acknowledged it with success. (No
        lock of ours is held while paho's are: its network thread calls _on_publish holding
        its own.)"""
        info = self.client.publish(topic, json.dumps(message, separators=(",", ":")), qos=1,
                                   retain=True)
        with self._puback:
            if not self._puback.wait_for(lambda: info.mid in self._acked, timeout):
                log.warning("%s: no PUBACK within %g s; trying again later", topic, timeout)
                return False
            reason = self._acked.pop(info.mid)
        if reason.is_failure:
            log.error("the broker refused the release on %s: %s", topic, reason)
            return False
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._puback:
            self._acked[mid] = reason_code
            self._puback.notify_all()

    def run(self) -> None:
        """In the foreground until stop() (from a signal handler) or Ctrl-C."""
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the controller: %s", self.broker.host,
                      self.broker.port, reason_code)
            return
        client.subscribe([(f, 1) for f in self.filters])
        log.info("controller %s connected to %s:%d (session %s); listening on %s",
                 self.name, self.broker.host, self.broker.port,
                 "resumed" if flags.session_present else "new", f"{PREFIX}/{self.fleet}/+/…")
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("controller disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if (len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/{self.fleet}"
                or parts[4] not in DEVICE_LEAVES):
            self.counters.bad += 1
            client.ack(message.mid, message.qos)
            return
        device, leaf = parts[3], parts[4]
        if not message.payload:  # a retained status being cleared
            client.ack(message.mid, message.qos)
            return
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            log.warning("%s: unreadable payload (%s); dropped", message.topic, e)
            self.counters.bad += 1
            client.ack(message.mid, message.qos)
            return
        if body.get("device") not in (None, device):
            log.warning("%s: payload claims device %r; stored as %r (the topic's)",
                        message.topic, body.get("device"), device)
        delay = 0.5
        while True:
            try:
                new = self.db.ingest(self.fleet, device, leaf, body, retained=message.retain)
                break
            except self.db.errors as e:
                if self._stop.is_set():
                    return  # not acknowledged: the broker sends it again next time
                log.error("fleet database: %s; retrying in %.1f s", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception:
                log.exception("%s: cannot ingest; dropped", message.topic)
                self.counters.bad += 1
                client.ack(message.mid, message.qos)
                return
        self.counters.messages += 1
        self.counters.new_events += new
        if leaf != "status" and new == 0:
            self.counters.repeated_messages += 1
        client.ack(message.mid, message.qos)


def send_command(broker: BrokerSettings, fleet: str, device: str, name: str,
                 args: dict | None = None, timeout: float = 30.0, expire_s: int = 3600,
                 client_name: str = "controller") -> dict:
    """Publish a command to a device's `cmd` topic and wait for its ack on the device's `ack`
    topic; returns the ack (`{"id", "command", "ok", "message", "data", ...}`). The broker
    drops the command if the device has not picked it up within `expire_s` (MQTT 5 message
    expiry). Raises TimeoutError when no ack came in `timeout` seconds."""
    cid = uuid.uuid4().hex
    client = broker.client(f"{username(fleet, client_name)}-cmd-{cid[:8]}", reconnect=(1, 5))
    ack: Future = Future()
    payload = json.dumps({"id": cid, "command": name, "args": args or {}})
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expire_s
    problem: list[str] = []

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            problem.append(f"the broker refused the connection: {reason_code}")
            return
        c.subscribe(device_topic(fleet, device, "ack"), qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:
        if reason_codes and reason_codes[0].is_failure:
            problem.append(f"cannot read the device's acks: {reason_codes[0]}")
            return
        c.publish(device_topic(fleet, device, "cmd"), payload, qos=1, properties=props)

    def on_publish(c, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            problem.append(f"the broker refused the command: {reason_code}")

    def on_message(c, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            events = json.loads(message.payload).get("events") or []
        except (ValueError, AttributeError):
            return
        for event in events:
            if isinstance(event, dict) and event.get("id") == cid and not ack.done():
                ack.set_result(event)

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_publish, client.on_message = on_publish, on_message
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive,
                         clean_start=True)
    client.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if problem:
                raise PermissionError(problem[0])
            if ack.done():
                return ack.result()
            time.sleep(0.05)
        raise TimeoutError(f"no ack from {device} within {timeout:g} s (command {cid}; it "
                           f"stays queued for the device for {expire_s} s)")
    finally:
        client.disconnect()
        client.loop_stop()
