"""Model releases end to end: `storyscan fleet keygen`, `publish-model` and `serve`, a private
mosquitto (tests/test_fleet.py's), and device agents that download, verify, self-test and
switch (device/updates.py), or refuse with the reason while the old model keeps answering.

Versions 1 and 2 are the trained demo bundle and a copy of it with version "2" in its manifest
(its files unchanged, so their hashes still hold); broken variants are made the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import Request, urlopen

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device.sync import Agent, DeviceConfig, device_topic, group_topic
from fleet.controller import send_command
from fleet.release import keygen, load_private_key, make_release, publish
from models.bundle import MANIFEST, load_bundle, sha256_file
from provisioning.provision import ProvisionError, provision_controller, provision_device
from tests.conftest import ROOT, TrainedDemo, copy_catalog, storyscan
from tests.test_fleet import (
    FLEET,
    Broker,
    Fleet,
    controller_settings,
    device_config,
    free_port,
    mosquitto,
    wait_for,
)

# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class Env:
    fleet: Fleet
    broker: Broker
    keys: Path
    artifacts: Path
    url: str
    serve_log: Path
    root: Path


@contextlib.contextmanager
def release_env(root: Path, groups: dict[str, str]) -> Iterator[Env]:
    """The operator's key pair, kiosks provisioned with its public key (`groups`: device ->
    group), the controller, a broker, and `storyscan fleet serve` on a free port."""
    keys = root / "keys"
    r = storyscan("fleet", "keygen", "--out", keys)
    assert r.returncode == 0, r.stderr
    out = root / "provisioned"
    devices = {d: provision_device(d, FLEET, g, out, "127.0.0.1:8883", out / "ca",
                                   release_key=keys / "release.pub")
               for d, g in groups.items()}
    ops = provision_controller("ops", FLEET, out, "127.0.0.1:8883", out / "ca")
    fleet = Fleet(out, devices, ops)
    broker = Broker(mosquitto(), out / "broker", root / "broker").start()
    artifacts = root / "artifacts"
    artifacts.mkdir()
    port = free_port()
    serve_log = root / "serve.log"
    with open(serve_log, "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("storyscan")), "fleet",
                                   "serve", str(artifacts), "--port", str(port), "--host",
                                   "127.0.0.1"], cwd=ROOT, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), 20, "storyscan fleet serve", serve_log.read_text)
        yield Env(fleet, broker, keys, artifacts, url, serve_log, root)
    finally:
        server.terminate()
        server.wait(15)
        broker.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """r1 in group g1, r2 in g2, r3 in g3."""
    with release_env(tmp_path_factory.mktemp("release"),
                     {"r1": "g1", "r2": "g2", "r3": "g3"}) as e:
        yield e


def _answers(url: str) -> bool:
    try:
        urlopen(url + "/nothing", timeout=1)
    except OSError as e:
        return getattr(e, "code", None) == 404
    return True


def variant(src: Path, dest: Path, version: str,
            edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of bundle `src` with another version (and `edit` applied to its files), its
    manifest's hashes brought up to date: a valid bundle, as an export would write it."""
    shutil.copytree(src, dest)
    if edit is not None:
        edit(dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["version"] = version
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(dest / name), bytes=(dest / name).stat().st_size)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    load_bundle(dest)
    return dest


@pytest.fixture(scope="module")
def versions(env: Env, trained_demo: TrainedDemo) -> dict[str, Path]:
    base = env.root / "bundles"
    v1 = trained_demo.bundle
    assert load_bundle(v1).manifest.get("golden"), "the export ships golden self-test data"
    return {"1": v1, "2": variant(v1, base / "v2", "2"), "3": variant(v1, base / "v3", "3")}


class Acks:
    """Every device's acks, read with the controller's credentials."""

    def __init__(self, env: Env) -> None:
        s = controller_settings(env.fleet, env.broker)
        self.events: list[dict] = []
        self.client = s.client(f"acme.ops-acks-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(device_topic(FLEET, "+", "ack"), 1)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(s.host, s.port)
        self.client.loop_start()
        assert subscribed.wait(10), "cannot read the devices' acks"

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        device = message.topic.split("/")[3]
        for e in json.loads(message.payload)["events"]:
            self.events.append({**e, "device": device})

    def of(self, device: str, command: str = "release-model") -> list[dict]:
        return [e for e in self.events if e["device"] == device and e["command"] == command]

    def next(self, device: str, before: int, timeout: float = 60,
             command: str = "release-model") -> dict:
        wait_for(lambda: len(self.of(device, command)) > before, timeout,
                 f"{device}'s ack #{before + 1} ({command})")
        return self.of(device, command)[before]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def acks(env: Env) -> Iterator[Acks]:
    a = Acks(env)
    try:
        yield a
    finally:
        a.close()


def device(env: Env, name: str, bundle: Path, where: Path) -> DeviceConfig:
    """The provisioned device config with its data under `where` and `bundle` installed."""
    path = device_config(env.fleet, name, env.broker, where)
    data = json.loads(path.read_text())
    data["paths"]["releases"] = str(where / "releases")
    path.write_text(json.dumps(data, indent=2))
    shutil.copytree(bundle, where / "bundle")
    return DeviceConfig.load(path)


def release(env: Env, bundle: Path, group: str, key: Path | None = None) -> dict:
    r = make_release(bundle, env.artifacts, env.url, load_private_key(
        key or env.keys / "release.key"), FLEET, group)
    return {"topic": r.topic, "message": r.message, "archive": r.archive}


def announce(env: Env, group: str, message: dict) -> None:
    publish(controller_settings(env.fleet, env.broker), FLEET,
            group_topic(FLEET, group, "release/model"), message, client_name="ops")


def running_version(config: DeviceConfig) -> str:
    """What a kiosk (re)started now would load: the config's bundle, checked."""
    cfg = DeviceConfig.load(config.path)
    bundle_path = cfg.path_of("bundle")
    assert bundle_path is not None
    return load_bundle(bundle_path).version


# --- the operator's tools ----------------------------------------------------------------------


def test_keygen_and_serve_with_ranges(env: Env) -> None:
    private, public = env.keys / "release.key", env.keys / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    r = storyscan("fleet", "keygen", "--out", env.keys)  # never overwritten silently
    assert r.returncode == 1 and "--force" in r.stderr
    provisioned = env.fleet.devices["r1"].folder
    assert (provisioned / "release.pub").read_bytes() == public.read_bytes()
    assert json.loads((provisioned / "device.json").read_text())["release_key"] == "release.pub"
    assert "release/#" in env.fleet.controller.acl
    with pytest.raises(ProvisionError, match="cannot read the release public key"):
        provision_device("r9", FLEET, "g1", env.root / "other", "127.0.0.1:8883",
                         env.root / "other-ca", release_key=env.fleet.devices["r1"].folder
                         / "client.crt")

    data = bytes(range(256)) * 40
    (env.artifacts / "blob.bin").write_bytes(data)
    with urlopen(f"{env.url}/blob.bin") as resp:
        assert resp.status == 200 and resp.read() == data
    with urlopen(Request(f"{env.url}/blob.bin", headers={"Range": "bytes=1000-"})) as resp:
        assert resp.status == 206 and resp.read() == data[1000:]
        assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    with urlopen(Request(f"{env.url}/blob.bin", headers={"Range": "bytes=10-19"})) as resp:
        assert resp.status == 206 and resp.read() == data[10:20]
    with pytest.raises(OSError) as e:
        urlopen(Request(f"{env.url}/blob.bin", headers={"Range": f"bytes={len(data)}-"}))
    assert getattr(e.value, "code", None) == 416


def test_the_archive_is_deterministic(env: Env, versions: dict[str, Path]) -> None:
    a = release(env, versions["2"], "g9")
    first = a["archive"].read_bytes()
    b = release(env, versions["2"], "g9")
    assert b["archive"].read_bytes() == first
    assert a["message"]["sha256"] == b["message"]["sha256"]
    assert a["topic"] == "storyscan/v1/acme/groups/g9/release/model"


# --- the device --------------------------------------------------------------------------------


def test_refusals_then_a_resumed_download_then_rollback(
        env: Env, versions: dict[str, Path], acks: Acks, tmp_path: Path) -> None:
    """Each bad release is refused with its reason and version 1 stays; a truncated download
    resumes with a Range request; rollback restores version 1."""
    config = device(env, "r1", versions["1"], tmp_path)
    agent = Agent(config).start()
    n = 0

    def refused(message: dict, reason: str) -> None:
        nonlocal n
        announce(env, "g1", message)
        ack = acks.next("r1", n)
        n += 1
        assert not ack["ok"] and reason in ack["message"], ack
        assert running_version(config) == "1"

    try:
        # older or equal versions
        refused(release(env, versions["1"], "g1")["message"], "not newer than the running 1")
        # signed with another key
        other = keygen(tmp_path / "other")[0]
        refused(release(env, versions["2"], "g1", key=other)["message"],
                "signature does not match")
        # the manifest changed after signing (a file swapped in with its new hash)
        good = release(env, versions["2"], "g1")
        tampered = variant(versions["2"], tmp_path / "tampered", "2", lambda d: np.save(
            d / "prototypes.npy", -np.load(d / "prototypes.npy")))
        forged = release(env, tampered, "g1")["message"]
        refused({**forged, "signature": good["message"]["signature"]},
                "signature does not match")
        # the archive is not the one announced
        refused({**good["message"], "sha256": "0" * 64}, "sha256 mismatch")
        # signed and intact, but its engine does not reproduce the golden outputs
        def break_golden(d: Path) -> None:
            np.save(d / "golden_embedding.npy", -np.load(d / "golden_embedding.npy"))

        broken = variant(versions["1"], tmp_path / "broken", "5", break_golden)
        refused(release(env, broken, "g1")["message"], "self-test failed")

        # truncated on the server: refused, the part kept; then complete: resumed, installed
        archive, full = good["archive"], good["archive"].read_bytes()
        archive.write_bytes(full[: len(full) // 2])
        served_before = env.serve_log.read_text().count('" 206 ')
        refused(good["message"], "truncated download")
        part = tmp_path / "releases" / "staging" / f"{good['message']['sha256']}.part"
        assert part.stat().st_size == len(full) // 2
        archive.write_bytes(full)
        announce(env, "g1", good["message"])
        ack = acks.next("r1", n)
        n += 1
        assert ack["ok"], ack
        assert "model 2 installed" in ack["message"] and "self-test passed" in ack["message"]
        assert env.serve_log.read_text().count('" 206 ') > served_before  # a Range request
        assert not part.exists()
        assert running_version(config) == "2"
        current = tmp_path / "releases" / "current"
        assert current.is_symlink() and load_bundle(current).version == "2"
        assert (tmp_path / "releases" / "previous").resolve() == (tmp_path / "bundle").resolve()
        wait_for(lambda: agent.versions()["model"] == load_bundle(current).key, 5,
                 "the status to report version 2")

        # rollback: back to version 1; the retained version 2 is not installed again
        settings = controller_settings(env.fleet, env.broker)
        back = send_command(settings, FLEET, "r1", "rollback", timeout=30, client_name="ops")
        assert back["ok"] and "rolled back to 1" in back["message"], back
        assert running_version(config) == "1"
        assert (tmp_path / "releases" / "previous").resolve().name.startswith("2-")
        announce(env, "g1", good["message"])
        ack = acks.next("r1", n)
        assert not ack["ok"] and "rolled this release back" in ack["message"]
        assert running_version(config) == "1"
    finally:
        agent.stop()


class _NoCamera:
    name = "none"

    def status(self) -> dict:
        return {}


def test_an_offline_kiosk_gets_the_release_on_reconnect(
        env: Env, versions: dict[str, Path], acks: Acks, trained_demo: TrainedDemo,
        tmp_path: Path) -> None:
    """Published with `storyscan fleet publish-model` while the kiosk is away; when its agent
    connects, the retained release is installed and the kiosk's pipeline switches on the
    kiosk's thread; it answers scans before, during and after. Rollback switches it back."""
    from device.kiosk import Kiosk
    from device.pipeline import Pipeline
    from device.scans import ScanLog
    from models.preprocess import load_image

    ctl = tmp_path / "controller.json"
    data = json.loads(env.fleet.controller.config.read_text())
    data["broker"] |= {"port": env.broker.port, "tls": None}
    ctl.write_text(json.dumps(data))
    r = storyscan("fleet", "publish-model", versions["3"], "--group", "g2", "--artifacts",
                  env.artifacts, "--url-base", env.url, "--key", env.keys / "release.key",
                  "--config", ctl, "--db", tmp_path / "fleet.db")
    assert r.returncode == 0, r.stderr
    assert "published (retained) on storyscan/v1/acme/groups/g2/release/model" in r.stdout
    assert "the whole group at once" in r.stdout

    config = device(env, "r2", versions["1"], tmp_path)
    pipeline = Pipeline.open(tmp_path / "bundle", copy_catalog(trained_demo, tmp_path))
    v1_key = pipeline.bundle.key
    kiosk = Kiosk(_NoCamera(), pipeline, ScanLog(tmp_path / "scans.db"))  # type: ignore[arg-type]
    stop = threading.Event()

    def loop() -> None:  # the kiosk's thread: its jobs between (here: no) frames
        while not stop.is_set():
            kiosk._run_jobs()
            time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    photo = load_image(next((trained_demo.data / "val").rglob("*.jpg")))
    assert kiosk.submit(photo).result(30).result.sku is not None
    agent = Agent(config, kiosk=kiosk).start()
    try:
        ack = acks.next("r2", 0)
        assert ack["ok"] and "loaded by the kiosk" in ack["message"], ack
        assert kiosk.pipeline.bundle.version == "3"
        scan = kiosk.submit(photo).result(30)
        assert scan.result.sku is not None
        assert kiosk.scans.recent(1)[0]["model"] == kiosk.pipeline.bundle.key != v1_key
        assert running_version(config) == "3"

        back = send_command(controller_settings(env.fleet, env.broker), FLEET, "r2",
                            "rollback", timeout=60, client_name="ops")
        assert back["ok"], back
        assert kiosk.pipeline.bundle.key == v1_key
        assert kiosk.submit(photo).result(30).result.sku is not None
    finally:
        agent.stop()
        stop.set()
        thread.join(5)


def test_without_a_release_key_every_release_is_refused(
        env: Env, versions: dict[str, Path], acks: Acks, tmp_path: Path) -> None:
    config = device(env, "r3", versions["1"], tmp_path)
    data = json.loads(config.path.read_text())
    data.pop("release_key")
    config.path.write_text(json.dumps(data))
    announce(env, "g3", release(env, versions["2"], "g3")["message"])
    agent = Agent(DeviceConfig.load(config.path)).start()
    try:
        ack = acks.next("r3", 0)
        assert not ack["ok"] and "no release public key" in ack["message"]
        assert running_version(config) == "1"
    finally:
        agent.stop()


def test_a_device_cannot_announce_releases(env: Env) -> None:
    """Only the controller writes release topics: a device's publish is refused (0x87)."""
    cfg = json.loads(env.fleet.devices["r1"].config.read_text())["broker"]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="acme.r1-x",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(cfg["username"], cfg["password"])
    codes: list = []
    client.on_publish = lambda c, u, mid, rc, p: codes.append(rc)
    client.connect("127.0.0.1", env.broker.port)
    client.loop_start()
    try:
        client.publish(group_topic(FLEET, "g1", "release/model"), b"{}", qos=1, retain=True)
        wait_for(lambda: codes, 10, "the PUBACK")
        assert codes[0].value == 0x87
    finally:
        client.disconnect()
        client.loop_stop()

