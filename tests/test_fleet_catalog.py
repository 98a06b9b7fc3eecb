"""Catalog releases end to end: `storyscan fleet publish-catalog` (or make_catalog_release), a
private mosquitto and `storyscan fleet serve` (tests/test_fleet_release.py's release_env), and
device agents that download, verify and apply them in one transaction (device/catalog_updates.py)
or refuse them with the reason while the catalog stays exactly as it was.

Every device starts from a copy of the trained demo catalog. A release adds VAS-100 (a story in
two languages, a price, one reference photo: a validation photo of the product it removes) and
removes that product, so a scan of the photo finds VAS-100 once its embedding is computed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.catalog import Catalog
from device.sync import Agent, DeviceConfig, group_topic
from fleet.release import keygen, load_private_key, make_catalog_release, pack, publish
from tests.conftest import TrainedDemo, copy_catalog, storyscan
from tests.test_fleet import FLEET, controller_settings, device_config, wait_for
from tests.test_fleet_release import Acks, Env, _NoCamera, release_env

COMMAND = "release-catalog"
NEW = "VAS-100"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One device per test, each in a group of its own (retained releases stay per group)."""
    with release_env(tmp_path_factory.mktemp("catalog-release"),
                     {d: d for d in ("c1", "c2", "c3", "c4")}) as e:
        yield e


@pytest.fixture
def acks(env: Env) -> Iterator[Acks]:
    a = Acks(env)
    try:
        yield a
    finally:
        a.close()


def kiosk_files(env: Env, name: str, trained_demo: TrainedDemo, where: Path) -> DeviceConfig:
    """The provisioned device config, its data under `where`, the demo catalog copied there."""
    copy_catalog(trained_demo, where)
    return DeviceConfig.load(device_config(env.fleet, name, env.broker, where))


def shop(trained_demo: TrainedDemo, where: Path, price: float = 89.0) -> tuple[Path, str, Path]:
    """A products CSV adding NEW, whose photo (relative to the CSV) is a validation photo of
    the demo catalog's first product; returns the CSV, that product's SKU and the photo."""
    gone = Catalog(trained_demo.catalog).skus()[0]
    photo = sorted((trained_demo.data / "val").rglob(f"{gone}/*.jpg"))[0]
    where.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(photo, where / "vase.jpg")
    csv = where / "products.csv"
    csv.write_text("sku,name,category,price,currency,story,story_de,images\n"
                   f'{NEW},Celadon Vase,vases,{price},EUR,"Thrown by hand in Jingdezhen.",'
                   '"Handgedreht in Jingdezhen.",vase.jpg\n', encoding="utf-8")
    return csv, gone, photo


def release(env: Env, source: Path, version: int, group: str, remove: list[str],
            key: Path | None = None) -> dict:
    return make_catalog_release(source, version, env.artifacts, env.url, load_private_key(
        key or env.keys / "release.key"), FLEET, group, remove).message


def announce(env: Env, group: str, message: dict) -> None:
    publish(controller_settings(env.fleet, env.broker), FLEET,
            group_topic(FLEET, group, "release/catalog"), message, client_name="ops")


def snapshot(db: Path) -> dict:
    """Everything a release may change: rows, meta and the media folder's files."""
    with sqlite3.connect(db) as conn:
        tables = {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}").fetchall()))
                  for t in ("meta", "products", "stories", "embeddings")}
    media = db.with_name("catalog-media")
    files = {str(f.relative_to(media)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(media.rglob("*")) if f.is_file()}
    return tables | {"media": files}


def forge(env: Env, message: dict, name: str, edit) -> dict:
    """The released archive unpacked, `edit(manifest bytes, files)` applied, packed again
    under `name`: the message with its new size and sha256 (the signature kept)."""
    archive = env.artifacts / message["url"].rsplit("/", 1)[1]
    folder = env.root / f"forge-{name}"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    manifest = (folder / "manifest.json").read_bytes()
    files = {f.name: f for f in folder.iterdir() if f.name != "manifest.json"}
    manifest, files = edit(manifest, files)
    out = env.artifacts / f"{name}.tar"
    pack(manifest, files, out)
    data = out.read_bytes()
    return {**message, "url": f"{env.url}/{name}.tar", "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


# --- the operator's side -----------------------------------------------------------------------


def test_the_catalog_archive_is_deterministic_and_signed_over_its_manifest(
        env: Env, trained_demo: TrainedDemo, tmp_path: Path) -> None:
    csv, gone, _ = shop(trained_demo, tmp_path / "shop")
    a = make_catalog_release(csv, 3, env.artifacts, env.url,
                             load_private_key(env.keys / "release.key"), FLEET, "c9", [gone])
    first = a.archive.read_bytes()
    b = make_catalog_release(csv, 3, env.artifacts, env.url,
                             load_private_key(env.keys / "release.key"), FLEET, "c9", [gone])
    assert b.archive.read_bytes() == first and a.message["sha256"] == b.message["sha256"]
    assert a.topic == "storyscan/v1/acme/groups/c9/release/catalog"
    m = a.message
    assert (m["kind"], m["version"], m["products"], m["images"], m["remove"]) == \
        ("catalog", 3, 1, 1, [gone])
    with tarfile.open(a.archive) as tar:
        assert tar.getnames() == ["manifest.json", f"{NEW}-00.jpg"]
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["products"][0]["stories"] == {"en": "Thrown by hand in Jingdezhen.",
                                                  "de": "Handgedreht in Jingdezhen."}
    assert manifest["files"][f"{NEW}-00.jpg"]["sha256"] == \
        hashlib.sha256((tmp_path / "shop" / "vase.jpg").read_bytes()).hexdigest()
    r = storyscan("fleet", "publish-catalog", csv, "--version", "0", "--group", "c9",
                  "--artifacts", env.artifacts, "--url-base", env.url, "--key",
                  env.keys / "release.key", "--broker", "127.0.0.1:1", "--fleet", FLEET)
    assert r.returncode == 1 and "a whole number from 1" in r.stderr
    r = storyscan("fleet", "publish-catalog", csv, "--version", "4", "--remove", NEW,
                  "--group", "c9", "--artifacts", env.artifacts, "--url-base", env.url,
                  "--key", env.keys / "release.key", "--broker", "127.0.0.1:1",
                  "--fleet", FLEET)
    assert r.returncode == 1 and f"SKUs both in {csv} and --remove: {NEW}" in r.stderr


# --- the device --------------------------------------------------------------------------------


def test_a_release_adds_and_removes_products_and_the_kiosk_embeds_them_at_start(
        env: Env, trained_demo: TrainedDemo, acks: Acks, tmp_path: Path) -> None:
    """Published with the command; the standalone agent applies it; a kiosk started then
    (Pipeline.open) embeds the new photo and recognises it as the new product."""
    from device.pipeline import Pipeline

    config = kiosk_files(env, "c1", trained_demo, tmp_path)
    db = tmp_path / "catalog.db"
    before = Catalog(db)
    version_before, count_before = before.version, len(before)
    csv, gone, photo = shop(trained_demo, tmp_path / "shop")
    ctl = tmp_path / "controller.json"
    data = json.loads(env.fleet.controller.config.read_text())
    data["broker"] |= {"port": env.broker.port, "tls": None}
    ctl.write_text(json.dumps(data))
    r = storyscan("fleet", "publish-catalog", csv, "--version", "1", "--remove", gone,
                  "--group", "c1", "--artifacts", env.artifacts, "--url-base", env.url,
                  "--key", env.keys / "release.key", "--config", ctl)
    assert r.returncode == 0, r.stderr
    assert "catalog release 1 published (retained) on storyscan/v1/acme/groups/c1/release/" \
           "catalog" in r.stdout

    agent = Agent(config).start()
    try:
        ack = acks.next("c1", 0, command=COMMAND)
        assert ack["ok"], ack
        assert "catalog release 1 applied: 1 products added or updated, 1 SKUs removed" in \
            ack["message"] and "when it next starts" in ack["message"]
        wait_for(lambda: agent.versions()["catalog_release"] == 1, 5, "catalog_release 1")
        assert agent.versions()["catalog_version"] == version_before + 1
    finally:
        agent.stop()

    catalog = Catalog(db)
    assert (catalog.version, catalog.release_version, len(catalog)) == \
        (version_before + 1, 1, count_before)
    assert catalog.product(gone) is None
    vase = catalog.product(NEW)
    assert vase is not None and (vase.name, vase.price, vase.story("de")) == \
        ("Celadon Vase", 89.0, "Handgedreht in Jingdezhen.")
    assert len(vase.images) == 1 and Path(vase.images[0]).read_bytes() == photo.read_bytes()
    assert not (db.with_name("catalog-media") / gone).exists()

    pipeline = Pipeline.open(trained_demo.bundle, db)
    skus, _ = catalog.embeddings(pipeline.references_key)
    assert NEW in skus and gone not in skus
    assert pipeline.scan_file(photo).sku == NEW


def test_older_equal_forged_and_tampered_releases_are_refused_and_change_nothing(
        env: Env, trained_demo: TrainedDemo, acks: Acks, tmp_path: Path) -> None:
    config = kiosk_files(env, "c2", trained_demo, tmp_path)
    db = tmp_path / "catalog.db"
    csv, gone, _ = shop(trained_demo, tmp_path / "shop")
    agent = Agent(config).start()
    n = 0

    def next_ack(message: dict) -> dict:
        nonlocal n
        announce(env, "c2", message)
        ack = acks.next("c2", n, command=COMMAND)
        n += 1
        return ack

    def refused(message: dict, reason: str) -> None:
        before = snapshot(db)
        ack = next_ack(message)
        assert not ack["ok"] and reason in ack["message"], ack
        assert ack["message"].startswith(f"catalog release {message['version']} refused: ")
        assert snapshot(db) == before

    try:
        assert next_ack(release(env, csv, 2, "c2", [gone]))["ok"]
        other = shop(trained_demo, tmp_path / "other", price=99.0)[0]
        refused(release(env, other, 1, "c2", []), "version 1 is not newer than the applied 2")
        refused(release(env, other, 2, "c2", []), "version 2 is not newer than the applied 2")

        good = release(env, other, 3, "c2", [])
        refused(release(env, other, 3, "c2", [], key=keygen(tmp_path / "keys")[0]),
                "signature does not match")
        refused({**good, "sha256": "0" * 64}, "sha256 mismatch")

        def raise_price(manifest: bytes, files: dict) -> tuple[bytes, dict]:
            return manifest.replace(b"99.0", b"9.0"), files

        refused(forge(env, good, "price", raise_price), "signature does not match")

        def swap_photo(manifest: bytes, files: dict) -> tuple[bytes, dict]:
            files[f"{NEW}-00.jpg"].write_bytes(b"not the photo that was signed")
            return manifest, files

        refused(forge(env, good, "photo", swap_photo),
                f"file '{NEW}-00.jpg' does not match its size and sha256")

        def climb_out(manifest: bytes, files: dict) -> tuple[bytes, dict]:
            return manifest, {**files, "../escape.jpg": files[f"{NEW}-00.jpg"]}

        refused(forge(env, good, "escape", climb_out), "'../escape.jpg', not a plain file")

        ack = next_ack(good)  # the genuine one still goes in
        assert ack["ok"], ack
        assert Catalog(db).product(NEW).price == 99.0  # type: ignore[union-attr]
        assert Catalog(db).release_version == 3
    finally:
        agent.stop()


def test_a_failure_while_applying_leaves_the_catalog_as_it_was(
        env: Env, trained_demo: TrainedDemo, acks: Acks, tmp_path: Path) -> None:
    """SQLite refuses the release's last write (a trigger, as a full disk would): nothing of it
    stays, not the removal, not the new product, not its copied photo. Announced again once
    the cause is gone, the same release is applied."""
    config = kiosk_files(env, "c3", trained_demo, tmp_path)
    db = tmp_path / "catalog.db"
    csv, gone, _ = shop(trained_demo, tmp_path / "shop")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER full BEFORE UPDATE ON meta WHEN NEW.key = 'version' "
                     "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    before = snapshot(db)
    message = release(env, csv, 1, "c3", [gone])
    agent = Agent(config).start()
    try:
        announce(env, "c3", message)
        ack = acks.next("c3", 0, command=COMMAND)
        assert not ack["ok"] and "database or disk is full" in ack["message"], ack
        assert snapshot(db) == before

        with sqlite3.connect(db) as conn:
            conn.execute("DROP TRIGGER full")
        announce(env, "c3", message)
        ack = acks.next("c3", 1, command=COMMAND)
        assert ack["ok"], ack
        catalog = Catalog(db)
        assert catalog.product(gone) is None and catalog.product(NEW) is not None
    finally:
        agent.stop()


def test_in_the_kiosks_process_the_kiosk_embeds_and_matches_before_the_ack(
        env: Env, trained_demo: TrainedDemo, acks: Acks, tmp_path: Path) -> None:
    """Announced while the kiosk is away; on connecting, the release is applied and the kiosk
    reloads its catalog on its own thread: the next scan of the photo finds the new product."""
    from device.kiosk import Kiosk
    from device.pipeline import Pipeline
    from device.scans import ScanLog

    config = kiosk_files(env, "c4", trained_demo, tmp_path)
    csv, gone, photo = shop(trained_demo, tmp_path / "shop")
    announce(env, "c4", release(env, csv, 5, "c4", [gone]))
    pipeline = Pipeline.open(trained_demo.bundle, tmp_path / "catalog.db")
    kiosk = Kiosk(_NoCamera(), pipeline, ScanLog(tmp_path / "scans.db"))  # type: ignore[arg-type]
    stop = threading.Event()

    def loop() -> None:  # the kiosk's thread: its jobs between (here: no) frames
        while not stop.is_set():
            kiosk._run_jobs()
            time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    scan = kiosk.submit_job(lambda: kiosk.pipeline.scan_file(photo))
    assert scan.result(30).sku == gone  # type: ignore[attr-defined]
    version = kiosk.catalog_version
    agent = Agent(config, kiosk=kiosk).start()
    try:
        ack = acks.next("c4", 0, command=COMMAND)
        assert ack["ok"] and "1 reference photos embedded and loaded by the kiosk" in \
            ack["message"], ack
        assert ack["data"]["embedded"] == 1
        assert kiosk.catalog_version == version + 1
        scan = kiosk.submit_job(lambda: kiosk.pipeline.scan_file(photo))
        assert scan.result(30).sku == NEW  # type: ignore[attr-defined]
        assert agent.versions()["catalog_release"] == 5
    finally:
        agent.stop()
        stop.set()
        thread.join(5)
