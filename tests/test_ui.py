"""The kiosk UI through Flask's test client, on the real trained demo model and catalog: a real
Kiosk (engine, matcher, scan log) runs its loop on a background thread with a still camera, so
uploads and enrolment go through its job queue as they do in the shop; camera scans come from
the synthetic scan video in lockstep. Nothing of ours is mocked."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.camera import Camera
from device.catalog import Catalog
from device.inventory import Inventory, InventoryError, parse_expected_csv
from device.kiosk import Kiosk
from device.pipeline import Pipeline
from device.scans import ScanLog
from device.sync import Agent, DeviceConfig
from kiosk_ui import create_app
from kiosk_ui.captures import Captures
from kiosk_ui.config import ConfigError, check_pin, load, set_pin
from kiosk_ui.live import Broadcaster
from kiosk_ui.search import fts_query
from tests.conftest import ROOT, TrainedDemo, copy_catalog
from trainer.synthetic import generate_demo, plan_products, write_scan_video

PIN = "2468"


@dataclass(frozen=True)
class Assets:
    counter: Path  # a folder with one photo of the empty counter: a camera that never triggers
    video: Path  # the scan video (products placed in turn), for camera scans in lockstep
    more: Path  # the demo shop with two products the model never saw (PLT-004, VAS-004)


@pytest.fixture(scope="module")
def assets(trained_demo: TrainedDemo, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("ui")
    counter = root / "counter"
    counter.mkdir()
    yy, xx = np.mgrid[0:360, 0:640]
    still = np.stack([150 + 30 * xx / 640, 140 + 20 * yy / 360, 120 + 0 * xx], -1)
    cv2.imwrite(str(counter / "empty.png"), still.astype(np.uint8))
    video = root / "scan.avi"
    write_scan_video(video, plan_products(12, seed=7), placements=3, width=640, height=360,
                     fps=12, seed=7, gap_s=1.0, move_s=0.5, hold_s=1.5)
    generate_demo(root / "more", products=14, train=6, val=0, scans=3, size=160, seed=7)
    return Assets(counter, video, root / "more")


class Rig:
    """One kiosk (real pipeline, scan log, camera) with its app; `run` starts the kiosk loop on
    a background thread, as `storyscan kiosk --ui` does; `device_config` runs the fleet agent
    in the kiosk's process, as `--agent` does."""

    def __init__(self, demo: TrainedDemo, folder: Path, camera: str, run: bool = True,
                 settings: dict | None = None, pin: str | None = PIN,
                 device_config: Path | None = None) -> None:
        self.folder = folder
        catalog = folder / "catalog.db"
        if not catalog.exists():
            copy_catalog(demo, folder)
        if pin:
            set_pin(folder / "kiosk.json", pin)
        self.camera = Camera(camera)
        self.kiosk = Kiosk(self.camera, Pipeline.open(demo.bundle, catalog),
                           ScanLog(folder / "scans.db"))
        self.agent = None
        if device_config is not None:
            self.agent = Agent(DeviceConfig.load(device_config), kiosk=self.kiosk).start()
        self.app = create_app(self.kiosk, settings=settings, agent=self.agent)
        self.client = self.app.test_client()
        self.camera.start()
        self.thread = None
        if run:
            self.thread = threading.Thread(target=self.kiosk.run, daemon=True)
            self.thread.start()

    def csrf(self, client=None) -> str:
        return (client or self.client).get("/api/session").get_json()["csrf_token"]

    def login(self, client=None) -> str:
        """Log the client in as staff; returns its (new) CSRF token."""
        client = client or self.client
        r = client.post("/api/session", json={"pin": PIN},
                        headers={"X-CSRF-Token": self.csrf(client)})
        assert r.status_code == 200, r.get_json()
        return r.get_json()["csrf_token"]

    def stop(self) -> None:
        self.app.extensions["storyscan"].close()
        self.kiosk.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)
        if self.agent is not None:
            self.agent.stop()
        self.camera.stop()


@pytest.fixture
def make_rig(trained_demo: TrainedDemo, assets: Assets, tmp_path: Path):
    rigs = []

    def make(camera: str | None = None, **kwargs) -> Rig:
        rig = Rig(trained_demo, kwargs.pop("folder", tmp_path),
                  camera or f"dir:{assets.counter}?fps=10", **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop()


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


@pytest.fixture(scope="module")
def photos(trained_demo: TrainedDemo) -> dict[str, Path]:
    """For each trained product, a held-out kiosk photo the model recognises (checked with a
    pipeline of its own), so the assertions below are about the UI, not the model."""
    pipeline = Pipeline.open(trained_demo.bundle, trained_demo.catalog)
    found = {}
    for path in sorted((trained_demo.data / "scans").rglob("*.jpg")):
        sku = path.parent.name
        if sku not in found and pipeline.scan_file(path).sku == sku:
            found[sku] = path
    return found


def upload(rig: Rig, path: Path | bytes, client=None, token: str | None = None, **form):
    client = client or rig.client
    blob = path.read_bytes() if isinstance(path, Path) else path
    return client.post("/api/scans", data={"photo": (io.BytesIO(blob), "photo.jpg"), **form},
                       headers={"X-CSRF-Token": token or rig.csrf(client)})


def no_trace(response) -> None:
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and 'File "' not in body


# --- the shopper's screen ----------------------------------------------------------------------


def test_shopper_screen_has_its_parts_and_the_catalogs_languages(rig: Rig) -> None:
    r = rig.client.get("/", headers={"Accept": "text/html"})
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    for element in ("idle", "preview", "result-card", "card-name", "card-story", "alternatives",
                    "not-this", "lang-switch", "upload-input"):
        assert f'id="{element}"' in html, element
    assert 'data-lang="en"' in html and 'data-lang="zh"' in html and "中文" in html
    page = json.loads(re.search(r'id="page-data">(.*?)</script>', html, re.S).group(1))
    assert [lang["code"] for lang in page["languages"]] == ["en", "zh"]
    assert page["strings"]["zh"]["not_this"] and page["card_seconds"] > 0
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "<script>" not in html  # no inline script: the page data is inert JSON
    for asset in ("kiosk.css", "shopper.js", "staff.js", "status.js"):
        assert rig.client.get(f"/static/{asset}").status_code == 200


def test_catalog_photos_are_served_and_nothing_else(rig: Rig) -> None:
    product = rig.client.get("/api/products/PLT-001").get_json()
    r = rig.client.get(product["photo"])
    assert r.status_code == 200 and r.mimetype == "image/jpeg" and r.data[:2] == b"\xff\xd8"
    for path in ("/media/../catalog.db", "/media/..%2Fcatalog.db", "/media/%2e%2e/kiosk.json",
                 "/media/PLT-001/none.jpg", "/media/../../etc/passwd", "/media/x/../../a.jpg"):
        r = rig.client.get(path)
        assert r.status_code == 404, path
        assert r.get_json() == {"error": "not found"}


def test_mjpeg_preview_streams_jpeg_parts_at_a_modest_size_and_rate(make_rig) -> None:
    rig = make_rig(settings={"PREVIEW_FPS": 4.0})
    r = rig.client.get("/preview.mjpg")
    assert r.status_code == 200
    assert r.mimetype == "multipart/x-mixed-replace"
    assert r.mimetype_params["boundary"] == "frame"
    parts = iter(r.response)
    t0 = time.monotonic()
    chunks = [next(parts) for _ in range(3)]
    elapsed = time.monotonic() - t0
    r.close()
    head, _, body = chunks[0].partition(b"\r\n\r\n")
    assert head.startswith(b"--frame\r\nContent-Type: image/jpeg")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    image = cv2.imdecode(np.frombuffer(body[:length], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] <= 640
    assert elapsed >= 2 / 4 * 0.9  # three parts at 4 fps: at least two intervals
    snapshot = rig.client.get("/preview.jpg")
    assert snapshot.status_code == 200 and snapshot.data[:2] == b"\xff\xd8"
    assert rig.app.extensions["storyscan"].preview.clients == 0  # the stream let go


def test_the_live_picture_stays_on_the_kiosks_own_screen(rig: Rig) -> None:
    phone = rig.app.test_client()
    phone.environ_base["REMOTE_ADDR"] = "192.0.2.7"  # a phone on the shop's network
    page = phone.get("/").get_data(as_text=True)
    assert 'id="preview"' not in page and 'id="upload-input"' in page
    for path in ("/preview.mjpg", "/preview.jpg"):
        r = phone.get(path)
        assert r.status_code == 403 and "own screen" in r.get_json()["error"]
    rig.login(phone)  # staff may look
    assert phone.get("/preview.jpg").status_code == 200
    assert 'id="preview"' in rig.client.get("/").get_data(as_text=True)  # the kiosk itself


def read_events(response, want: int, timeout: float = 60) -> list[str]:
    """The first `want` SSE messages (blank-line separated) of a streamed response."""
    messages, buffer = [], ""
    deadline = time.monotonic() + timeout
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            message, buffer = buffer.split("\n\n", 1)
            messages.append(message)
        if len(messages) >= want or time.monotonic() > deadline:
            break
    return messages


def event_data(message: str) -> dict:
    return json.loads("".join(line[6:] for line in message.splitlines()
                              if line.startswith("data: ")))


def test_server_sent_events_deliver_each_scan_as_a_card(make_rig, photos) -> None:
    rig = make_rig(settings={"SSE_HEARTBEAT_S": 0.3})
    stream = rig.client.get("/events")
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    first = read_events(stream, 1)[0]
    assert first.startswith("retry: ")
    photo = photos["PLT-001"]
    assert upload(rig, photo).status_code == 201  # the kiosk records it, the stream hears it
    messages = read_events(stream, 2)
    stream.close()
    scans = [m for m in messages if m.startswith("event: scan")]
    assert scans, messages
    card = event_data(scans[0])
    assert card["scan"]["sku"] == photo.parent.name and card["scan"]["mode"] == "upload"
    assert card["product"]["name"] and set(card["product"]["stories"]) == {"en", "zh"}
    assert card["product"]["photo"].startswith("/media/")
    assert re.search(r"^id: \d+$", scans[0], re.M)
    # nothing more to say: a heartbeat comment keeps the connection open
    stream = rig.client.get("/events")
    assert any(m.startswith(": heartbeat") for m in read_events(stream, 2))
    stream.close()
    assert len(rig.app.extensions["storyscan"].broadcaster) == 0


def test_a_slow_screen_loses_its_oldest_scans_not_the_kiosk_its_pace() -> None:
    hub = Broadcaster(max_clients=1, backlog=2)
    q = hub.register()
    assert hub.register() is None  # full
    for i in range(5):
        hub.publish(i)  # never blocks
    assert [q.get_nowait(), q.get_nowait()] == [3, 4]
    hub.unregister(q)
    assert len(hub) == 0


# --- uploads, results, corrections -------------------------------------------------------------


def test_an_uploaded_photo_is_recognised_and_a_correction_recorded(rig: Rig, photos) -> None:
    photo = photos["VAS-001"]
    r = upload(rig, photo)
    assert r.status_code == 201, r.get_json()
    card = r.get_json()
    assert card["scan"]["sku"] == "VAS-001" and not card["scan"]["unknown"]
    assert card["product"]["stories"]["zh"] and card["product"]["price"] > 0
    assert card["product"]["currency"] == "EUR"
    assert card["alternatives"] and all(a["sku"] != "VAS-001" and a["name"] and a["photo"]
                                        for a in card["alternatives"])
    scan_id = card["scan"]["id"]
    listed = rig.client.get("/api/scans?limit=5").get_json()["scans"]
    assert listed[0]["id"] == scan_id and listed[0]["mode"] == "upload"
    again = rig.client.get(f"/api/scans/{scan_id}").get_json()
    assert again["product"]["sku"] == "VAS-001"
    assert [a["sku"] for a in again["alternatives"]] == [a["sku"] for a in card["alternatives"]]
    # "Not this one?": a tap on the right product
    right = card["alternatives"][0]["sku"]
    token = rig.csrf()
    r = rig.client.post(f"/api/scans/{scan_id}/correction", json={"sku": right},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 201 and r.get_json()["sku"] == right
    log = ScanLog(rig.folder / "scans.db")
    assert log.corrections() == [{"scan_id": scan_id, "scanned": listed[0]["time"],
                                  "recognised": "VAS-001", "actual": right,
                                  "source": "upload"}]
    r = rig.client.post(f"/api/scans/{scan_id}/correction", json={"sku": "NOPE-1"},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "not a product" in r.get_json()["error"]
    r = rig.client.post("/api/scans/999999/correction", json={"sku": right},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 404 and r.get_json() == {"error": "no scan 999999"}
    assert rig.client.get("/api/scans/999999").status_code == 404


def test_an_unknown_item_comes_back_unknown_with_best_guesses(rig: Rig,
                                                              assets: Assets) -> None:
    r = upload(rig, (assets.counter / "empty.png").read_bytes())
    assert r.status_code == 201
    card = r.get_json()
    assert card["scan"]["unknown"] and card["product"] is None and card["scan"]["sku"] is None
    assert card["alternatives"]  # "Is it one of these?"


def test_bad_uploads_are_refused_with_one_line_and_nothing_recorded(rig: Rig, photos) -> None:
    good = photos["PLT-001"].read_bytes()
    cases = {
        b"this is a text file, not a photo\n": (415, "not an image"),
        b"": (415, "empty file"),
        good[: len(good) // 2]: (400, "truncated JPEG"),
    }
    for blob, (status, words) in cases.items():
        r = upload(rig, blob)
        assert r.status_code == status, (words, r.get_json())
        assert words in r.get_json()["error"] and "\n" not in r.get_json()["error"]
        no_trace(r)
    too_large = good + b"\0" * (11 * 1024 * 1024)
    r = upload(rig, too_large)
    assert r.status_code == 413 and "too large" in r.get_json()["error"]
    r = rig.client.post("/api/scans", data={}, headers={"X-CSRF-Token": rig.csrf()})
    assert r.status_code == 400 and "no photo" in r.get_json()["error"]
    assert len(ScanLog(rig.folder / "scans.db")) == 0
    # counting stock by upload is for staff
    r = upload(rig, good, mode="inventory")
    assert r.status_code == 401


def test_posts_without_the_csrf_token_are_refused(rig: Rig, photos) -> None:
    photo = (io.BytesIO(photos["PLT-001"].read_bytes()), "p.jpg")
    r = rig.client.post("/api/scans", data={"photo": photo})
    assert r.status_code == 403 and "CSRF" in r.get_json()["error"]
    rig.csrf()
    r = rig.client.post("/api/scans/1/correction", json={"sku": "PLT-001"},
                        headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    r = rig.client.post("/staff/login", data={"pin": PIN})  # a form without its hidden token
    assert r.status_code == 403
    r = rig.client.post("/api/session", json={"pin": PIN})
    assert r.status_code == 403
    assert len(ScanLog(rig.folder / "scans.db")) == 0


# --- products and search -----------------------------------------------------------------------


def test_products_and_catalog_api(rig: Rig) -> None:
    info = rig.client.get("/api/catalog").get_json()
    assert info["products"] == 12 and [lang["code"] for lang in info["languages"]] == ["en", "zh"]
    products = rig.client.get("/api/products").get_json()["products"]
    assert len(products) == 12 and all(p["photo"] and "stories" not in p for p in products)
    vases = rig.client.get("/api/products?category=vases").get_json()["products"]
    assert vases and {p["category"] for p in vases} == {"vases"}
    one = rig.client.get("/api/products/SHT-001").get_json()
    assert one["name"] and set(one["stories"]) == {"en", "zh"} and one["languages"] == ["en", "zh"]
    r = rig.client.get("/api/products/NOPE-1")
    assert r.status_code == 404 and r.get_json() == {"error": "no product 'NOPE-1'"}


def test_search_finds_stories_in_english_and_chinese(rig: Rig) -> None:
    catalog = Catalog(rig.folder / "catalog.db")
    vase = catalog.product("VAS-001")
    word = re.findall(r"[A-Za-z]{6,}", vase.stories["en"])[-1]
    hits = rig.client.get(f"/api/search?q={word[:5]}").get_json()["results"]
    assert "VAS-001" in [h["sku"] for h in hits]
    hit = next(h for h in hits if h["sku"] == "VAS-001")
    assert word[:5].casefold() in hit["snippet"].casefold() and hit["name"] == vase.name
    zh = rig.client.get("/api/search", query_string={"q": "花瓶", "lang": "zh"}).get_json()
    assert zh["results"] and all(r["lang"] == "zh" and "花瓶" in r["snippet"]
                                 for r in zh["results"])
    assert {r["sku"] for r in zh["results"]} <= {p.sku for p in catalog.products()
                                                  if "花瓶" in p.stories.get("zh", "")}
    assert "VAS-001" in {r["sku"] for r in zh["results"]}
    for nasty in ('"', "NEAR(a b", "*", "a OR", "'; drop table stories; --"):
        r = rig.client.get("/api/search", query_string={"q": nasty})
        assert r.status_code == 200, nasty
    assert fts_query('"x" NEAR 花瓶*') == '"x"* "NEAR"* "花 瓶"'
    r = rig.client.get("/api/search?q=")
    assert r.status_code == 400 and r.get_json()["error"].startswith("q:")


# --- staff login -------------------------------------------------------------------------------


def test_five_wrong_pins_lock_the_client_out(make_rig) -> None:
    rig = make_rig(settings={"PIN_LOCK_SECONDS": 2})
    token = rig.csrf()
    for tries_left in (4, 3, 2, 1):
        r = rig.client.post("/api/session", json={"pin": "0000"},
                            headers={"X-CSRF-Token": token})
        assert r.status_code == 401
        assert r.get_json()["error"] == (f"wrong PIN ({tries_left} "
                                         f"{'try' if tries_left == 1 else 'tries'} left)")
    r = rig.client.post("/api/session", json={"pin": "0000"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 429 and "locked" in r.get_json()["error"]
    assert int(r.headers["Retry-After"]) >= 2
    # locked: the right PIN does not get in either, through the form or the API
    r = rig.client.post("/api/session", json={"pin": PIN}, headers={"X-CSRF-Token": token})
    assert r.status_code == 429
    r = rig.client.post("/staff/login", data={"pin": PIN, "csrf_token": token},
                        headers={"Accept": "text/html"})
    assert r.status_code == 429 and 'id="login-error"' in r.get_data(as_text=True)
    assert rig.client.get("/api/session").get_json()["staff"] is False
    # another client (another address) is not locked
    other = rig.app.test_client()
    other.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    rig.login(other)
    time.sleep(2.2)  # the lock runs out
    r = rig.client.post("/staff/login", data={"pin": PIN, "csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"].endswith("/staff")
    assert rig.client.get("/api/session").get_json()["staff"] is True


def test_a_wrong_pin_on_the_login_page_says_so(rig: Rig) -> None:
    token = rig.csrf()
    r = rig.client.post("/staff/login", data={"pin": "1111", "csrf_token": token})
    assert r.status_code == 401
    assert "wrong PIN (4 tries left)" in r.get_data(as_text=True)
    page = rig.client.get("/staff/login")
    assert page.status_code == 200 and 'id="pin"' in page.get_data(as_text=True)


def test_without_a_pin_staff_mode_is_closed(make_rig) -> None:
    rig = make_rig(pin=None)
    r = rig.client.post("/api/session", json={"pin": "0000"},
                        headers={"X-CSRF-Token": rig.csrf()})
    assert r.status_code == 403 and "storyscan kiosk-pin" in r.get_json()["error"]
    config = json.loads((rig.folder / "kiosk.json").read_text())
    assert "pin_hash" not in config and len(config["secret_key"]) == 64
    assert (rig.folder / "kiosk.json").stat().st_mode & 0o777 == 0o600


def test_staff_pages_and_endpoints_need_a_login(rig: Rig) -> None:
    for path in ("/staff", "/staff/", "/status", "/staff/enrol", "/staff/inventory/1"):
        r = rig.client.get(path)
        assert r.status_code == 302 and "/staff/login" in r.headers["Location"], path
    for path in ("/api/status", "/api/inventory/sessions", "/api/inventory/sessions/1",
                 "/api/inventory/sessions/1/export.csv"):
        r = rig.client.get(path)
        assert r.status_code == 401 and r.get_json() == {"error": "staff login required"}
    token = rig.csrf()
    r = rig.client.post("/api/inventory/sessions", json={"name": "x"},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 401
    r = rig.client.post("/staff/inventory", data={"name": "x", "csrf_token": token})
    assert r.status_code == 302  # to the login page
    assert Inventory(rig.folder / "scans.db").sessions() == []


def test_an_idle_staff_session_expires(make_rig) -> None:
    rig = make_rig(settings={"PERMANENT_SESSION_LIFETIME": timedelta(seconds=2)})
    rig.login()
    for _ in range(2):  # each staff request moves the deadline on
        time.sleep(1.2)
        assert rig.client.get("/api/status").status_code == 200
    for _ in range(6):  # then only the shopper's screen: it keeps the cookie, not staff
        time.sleep(0.5)
        rig.client.get("/api/session")
    assert rig.client.get("/api/session").get_json()["staff"] is False
    r = rig.client.get("/api/status")
    assert r.status_code == 401 and r.get_json() == {"error": "staff session expired: "
                                                              "log in again"}
    r = rig.client.get("/status")
    assert r.status_code == 302 and "/staff/login" in r.headers["Location"]
    assert rig.client.get("/api/session").get_json()["staff"] is False


def test_logout(rig: Rig) -> None:
    token = rig.login()
    r = rig.client.post("/staff/logout", data={"csrf_token": token})
    assert r.status_code == 303
    assert rig.client.get("/api/status").status_code == 401
    token = rig.login()
    assert rig.client.delete("/api/session", headers={"X-CSRF-Token": token}).get_json() == {
        "staff": False}


# --- status ------------------------------------------------------------------------------------


def test_status_page_and_api(rig: Rig, photos) -> None:
    rig.login()
    assert upload(rig, photos["PLT-001"]).status_code == 201  # a latency to report
    # the kiosk loop reports a frame rate once it has read two frames (a loaded machine may
    # still be warming the engine up when the upload returns)
    wait_until(lambda: rig.client.get("/api/status").get_json()["fps"] > 0, 30,
               "the kiosk loop's first frames")
    status = rig.client.get("/api/status").get_json()
    assert status["model"]["key"] == rig.kiosk.pipeline.bundle.key
    assert status["model"]["architecture"] == "efficientnet_lite0"
    assert status["engine"] == {"backend": "onnxruntime", "precision": "int8"}
    assert status["catalog"] == {"version": rig.kiosk.catalog_version, "products": 12,
                                 "languages": ["en", "zh"]}
    assert status["camera"]["state"] == "ok" and status["fps"] > 0
    assert status["latency_ms"]["p95"] >= status["latency_ms"]["p50"] > 0
    assert status["scans"]["recorded"] == 1
    system = status["system"]
    assert system["source"] in ("psutil", "jtop") and 0 <= system["cpu_percent"] <= 100
    assert len(system["load_average"]) == 3 and isinstance(system["temperatures_c"], dict)
    assert status["sync"] == {"state": "not configured", "outbox": None}
    page = rig.client.get("/status")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert rig.kiosk.pipeline.bundle.key in html and "not configured" in html


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)


def test_status_shows_the_in_process_agents_link_and_outbox(make_rig, photos,
                                                            tmp_path: Path) -> None:
    """A kiosk whose fleet broker is down: the page says so, and its scans wait in the
    outbox."""
    port = free_port()  # nothing listens there
    config = tmp_path / "device.json"
    config.write_text(json.dumps({
        "device": "k9", "fleet": "acme", "group": "g1",
        "broker": {"host": "127.0.0.1", "port": port}, "paths": {"outbox": "outbox.db"},
        "agent": {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5}}))
    rig = make_rig(device_config=config)
    rig.login()

    def sync() -> dict:
        return rig.client.get("/api/status").get_json()["sync"]

    wait_until(lambda: sync()["outbox"]["pending_telemetry"] >= 1, 10, "the first telemetry")
    first = sync()
    assert first["state"] == "disconnected" and first["broker"] == f"127.0.0.1:{port}"
    assert not first["tls"] and first["device"] == "k9"
    assert first["outbox"]["pending_scans"] == 0 and first["outbox"]["dropped_telemetry"] == 0
    assert first["published"] == 0 and first["refused"] == 0 and first["last_refusal"] is None
    for sku in ("PLT-001", "VAS-001"):
        assert upload(rig, photos[sku]).status_code == 201
    wait_until(lambda: sync()["outbox"]["pending_scans"] == 2, 10, "2 scans in the outbox")
    page = rig.client.get("/status").get_data(as_text=True)
    assert re.search(r'id="sync-state">disconnected<', page)
    assert f"127.0.0.1:{port}" in page
    outbox = re.search(r'id="sync-outbox">(.*?)</td>', page).group(1)
    assert re.search(r'pending_scans">2</span> scans', outbox), outbox
    doc = rig.client.get("/api/openapi.json").get_json()
    assert set(sync()) <= set(doc["components"]["schemas"]["Sync"]["properties"])


# --- inventory ---------------------------------------------------------------------------------


def counts_of(rig: Rig, session_id: int) -> dict[str, dict]:
    body = rig.client.get(f"/api/inventory/sessions/{session_id}").get_json()
    return {r["sku"]: r for r in body["counts"]}


def test_inventory_session_from_start_to_export_and_after_a_restart(
        make_rig, photos, tmp_path: Path) -> None:
    rig = make_rig()
    token = rig.login()
    # start (a staff form): the kiosk now counts
    r = rig.client.post("/staff/inventory", data={"name": "Friday count", "csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"].endswith("/staff/inventory/1")
    assert (rig.kiosk.mode, rig.kiosk.session) == ("inventory", "1")
    r = rig.client.post("/api/inventory/sessions", json={"name": "another"},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 409 and "still open" in r.get_json()["error"]
    # scans of the session count through the kiosk listener: two of one product, one other
    for sku in ("VAS-001", "VAS-001", "RNG-002"):
        card = upload(rig, photos[sku], token=token, mode="inventory")
        assert card.status_code == 201 and card.get_json()["scan"]["mode"] == "inventory"
        assert card.get_json()["scan"]["session"] == "1"
    counts = counts_of(rig, 1)
    assert counts["VAS-001"]["counted"] == 2 and counts["RNG-002"]["counted"] == 1
    assert card.get_json()["counted"] == 1  # the card says how many so far
    # a shopper's upload does not count
    assert upload(rig, photos["VAS-001"]).status_code == 201
    assert counts_of(rig, 1)["VAS-001"]["counted"] == 2
    # manual +/-: the API (the page's script) and the form
    r = rig.client.post("/api/inventory/sessions/1/counts", json={"sku": "PLT-003", "delta": 3},
                        headers={"X-CSRF-Token": token})
    assert r.get_json() == {"sku": "PLT-003", "counted": 3}
    r = rig.client.post("/staff/inventory/1/adjust",
                        data={"sku": "PLT-003", "delta": "-1", "csrf_token": token})
    assert r.status_code == 303
    r = rig.client.post("/api/inventory/sessions/1/counts", json={"sku": "RNG-002", "delta": -5},
                        headers={"X-CSRF-Token": token})
    assert r.get_json()["counted"] == 0  # never below zero
    r = rig.client.post("/api/inventory/sessions/1/counts", json={"sku": "../x", "delta": 1},
                        headers={"X-CSRF-Token": token})
    assert r.status_code == 400
    # expected counts: a CSV file through the form, a text/csv body through the API
    form_csv = (io.BytesIO(b"sku,expected\r\nVAS-001,2\r\nPLT-003,5\r\n"), "expected.csv")
    r = rig.client.post("/staff/inventory/1/import",
                        data={"file": form_csv, "csrf_token": token}, follow_redirects=True)
    assert "Expected counts for 2 products imported." in r.get_data(as_text=True)
    r = rig.client.post("/api/inventory/sessions/1/expected", data="SHT-001,4\nGONE-9,1\n",
                        content_type="text/csv", headers={"X-CSRF-Token": token})
    assert r.get_json() == {"imported": 2, "not_in_catalog": ["GONE-9"]}
    r = rig.client.post("/api/inventory/sessions/1/expected", data="VAS-001,two\n",
                        content_type="text/csv", headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1:")
    # the discrepancy view: expected vs counted
    counts = counts_of(rig, 1)
    assert {s: (r["expected"], r["counted"], r["difference"]) for s, r in counts.items()} == {
        "VAS-001": (2, 2, 0), "PLT-003": (5, 2, -3), "RNG-002": (None, 0, 0),
        "SHT-001": (4, 0, -4), "GONE-9": (1, 0, -1)}
    page = rig.client.get("/staff/inventory/1?view=discrepancies").get_data(as_text=True)
    table = page[page.index('id="inventory-table"'):]
    assert 'data-sku="PLT-003"' in table and 'data-sku="SHT-001"' in table
    assert 'data-sku="VAS-001"' not in table
    assert rig.client.get("/staff/inventory/1").get_data(as_text=True).count("data-sku=") == 5
    # export
    r = rig.client.get("/staff/inventory/1/export.csv")
    assert r.mimetype == "text/csv" and "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert [row["sku"] for row in rows] == sorted(counts)
    plate = next(row for row in rows if row["sku"] == "PLT-003")
    assert plate == {"sku": "PLT-003", "name": Catalog(rig.folder / "catalog.db").product(
        "PLT-003").name, "expected": "5", "counted": "2", "difference": "-3"}
    assert rig.client.get("/api/inventory/sessions/1/export.csv").data == r.data

    # a restart (power cut or update): new kiosk, new app, same files; counting goes on
    rig.stop()
    rig2 = make_rig(folder=tmp_path)
    assert (rig2.kiosk.mode, rig2.kiosk.session) == ("inventory", "1")
    token = rig2.login()
    assert counts_of(rig2, 1) == counts
    assert upload(rig2, photos["SHT-001"], token=token,
                  mode="inventory").get_json()["counted"] == 1
    # close: the kiosk goes back to the shopper's screen; the session is read-only
    r = rig2.client.post("/staff/inventory/1/close", data={"csrf_token": token})
    assert r.status_code == 303 and rig2.kiosk.mode == "shopper"
    r = rig2.client.post("/api/inventory/sessions/1/counts", json={"sku": "VAS-001"},
                         headers={"X-CSRF-Token": token})
    assert r.status_code == 409 and "closed" in r.get_json()["error"]
    r = rig2.client.post("/api/inventory/sessions/1/close", headers={"X-CSRF-Token": token})
    assert r.status_code == 409
    sessions = rig2.client.get("/api/inventory/sessions").get_json()
    assert sessions["open"] is None and sessions["sessions"][0]["closed"]
    assert rig2.client.get("/api/inventory/sessions/9").status_code == 404
    # the next session starts from nothing
    r = rig2.client.post("/api/inventory/sessions", json={"name": "Monday"},
                         headers={"X-CSRF-Token": token})
    assert r.status_code == 201 and r.get_json()["id"] == 2 and rig2.kiosk.session == "2"
    home = rig2.client.get("/staff").get_data(as_text=True)
    assert 'id="sessions-table"' in home and "Friday count" in home and "Monday" in home


def test_camera_scans_count_towards_the_open_session(make_rig, assets: Assets,
                                                     tmp_path: Path) -> None:
    rig = make_rig(camera=f"{assets.video}?fps=0", run=False)  # stepped in lockstep below
    token = rig.login()
    r = rig.client.post("/api/inventory/sessions", json={"name": "shelf 3"},
                        headers={"X-CSRF-Token": token})
    session = r.get_json()["id"]
    stream = rig.client.get("/events")
    read_events(stream, 1)
    scans, last = [], 0
    while len(scans) < 3:
        frame = rig.camera.latest(after=last, timeout=10)
        assert frame is not None
        last = frame.seq
        scan = rig.kiosk.step(frame)  # the loop's work, on this thread
        if scan is not None:
            scans.append(scan)
    assert all(s.mode == "inventory" and s.session == str(session) for s in scans)
    expected: dict[str, int] = {}
    for s in scans:
        if not s.result.unknown:
            expected[s.result.sku] = expected.get(s.result.sku, 0) + 1
    assert expected  # the demo's products, recognised
    assert {s: r["counted"] for s, r in counts_of(rig, session).items()} == expected
    cards = [event_data(m) for m in read_events(stream, 3) if m.startswith("event: scan")]
    stream.close()
    assert [c["scan"]["id"] for c in cards] == [s.id for s in scans]
    assert all(c["counted"] >= 1 for c in cards if c["product"])


# --- enrolment ---------------------------------------------------------------------------------


def test_an_enrolled_product_is_recognised_right_away(rig: Rig, assets: Assets) -> None:
    new = assets.more / "scans" / "vases" / "VAS-004"
    before = upload(rig, sorted(new.glob("*.jpg"))[0]).get_json()
    assert before["scan"]["sku"] != "VAS-004"
    token = rig.login()
    photos = sorted((assets.more / "train" / "vases" / "VAS-004").glob("*.jpg"))[:5]
    form = {"sku": "VAS-004", "name": "Night Garden Vase", "category": "vases",
            "price": "89,00", "currency": "eur", "story_en": "Thrown in Gouda.",
            "story_zh": "在豪达拉坯成型。", "csrf_token": token,
            "photos": [(io.BytesIO(p.read_bytes()), p.name) for p in photos]}
    r = rig.client.post("/staff/enrol", data=form, follow_redirects=True)
    assert r.status_code == 200
    assert "VAS-004 (Night Garden Vase) enrolled: 5 reference photos, recognisable now" in \
        r.get_data(as_text=True)
    product = rig.client.get("/api/products/VAS-004").get_json()
    assert product["stories"] == {"en": "Thrown in Gouda.", "zh": "在豪达拉坯成型。"}
    assert product["price"] == 89.0 and product["currency"] == "EUR"
    assert len(product["photos"]) == 5
    assert rig.client.get(product["photos"][0]).status_code == 200
    found = [upload(rig, p, token=token).get_json()["scan"]["sku"] for p in
             sorted(new.glob("*.jpg"))]
    assert found.count("VAS-004") >= 2, found
    assert rig.kiosk.catalog_version == Catalog(rig.folder / "catalog.db").version
    # more photos of a known product through the API; a bad photo changes nothing
    more = sorted((assets.more / "train" / "vases" / "VAS-004").glob("*.jpg"))[5]
    r = rig.client.post("/api/products", headers={"X-CSRF-Token": token}, data={
        "sku": "VAS-004", "photos": [(io.BytesIO(more.read_bytes()), more.name)]})
    assert r.status_code == 200 and r.get_json()["photos"] == 6 and not r.get_json()["new"]
    r = rig.client.post("/api/products", headers={"X-CSRF-Token": token}, data={
        "sku": "PLT-004", "name": "Plate", "category": "plates",
        "photos": [(io.BytesIO(b"\xff\xd8\xff\xe0 not really"), "broken.jpg")]})
    assert r.status_code == 400 and "photo 1" in r.get_json()["error"]
    assert rig.client.get("/api/products/PLT-004").status_code == 404
    r = rig.client.post("/api/products", headers={"X-CSRF-Token": token}, data={
        "sku": "PLT-004", "photos": [(io.BytesIO(more.read_bytes()), more.name)]})
    assert r.status_code == 400 and "give its name and category" in r.get_json()["error"]
    page = rig.client.get("/staff/enrol").get_data(as_text=True)
    assert 'id="enrol-form"' in page and 'name="story_zh"' in page


def placement_camera(assets: Assets, folder: Path, sku_dir: Path, n: int) -> str:
    """A folder camera: the empty counter, then `n` photos of the product each standing on it
    for 2 s with the counter empty in between, looping."""
    folder.mkdir()
    counter = cv2.imread(str(assets.counter / "empty.png"))
    frames = [counter] * 12
    for photo in sorted(sku_dir.glob("*.jpg"))[:n]:
        placed = counter.copy()
        placed[80:280, 220:420] = cv2.resize(cv2.imread(str(photo)), (200, 200))
        frames += [placed] * 20 + [counter] * 8
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return f"dir:{folder}?fps=10"


def test_a_product_enrolled_from_camera_captures_is_recognised(make_rig, assets: Assets,
                                                                 tmp_path: Path) -> None:
    new = assets.more / "train" / "vases" / "VAS-004"
    rig = make_rig(camera=placement_camera(assets, tmp_path / "camera", new, 3))
    token = rig.login()
    json_post = {"X-CSRF-Token": token, "Accept": "application/json"}
    numbers = []
    for _ in range(3):  # each placement: wait for its scan, then capture while it stands
        seen = rig.kiosk.recorded
        wait_until(lambda seen=seen: rig.kiosk.recorded > seen, 30, "the next placement")
        r = rig.client.post("/staff/enrol/captures", headers=json_post)
        assert r.status_code == 200, r.get_json()
        numbers = [c["n"] for c in r.get_json()["captures"]]
    assert numbers == [1, 2, 3]
    page = rig.client.get("/staff/enrol").get_data(as_text=True)
    assert page.count('<li data-n="') == 3 and 'id="capture"' in page
    thumb = rig.client.get("/staff/enrol/captures/2.jpg")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    crop = cv2.imdecode(np.frombuffer(thumb.data, np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape[0] == crop.shape[1] < 360  # cut out around the product, as a scan is
    r = rig.client.post("/staff/enrol", data={
        "sku": "VAS-004", "name": "Night Garden Vase", "category": "vases",
        "csrf_token": token}, follow_redirects=True)
    assert "VAS-004 (Night Garden Vase) enrolled: 3 reference photos, recognisable now" in \
        r.get_data(as_text=True)
    assert '<li data-n="' not in r.get_data(as_text=True)  # the captures went with it
    assert rig.client.get("/staff/enrol/captures/2.jpg").status_code == 404
    found = [upload(rig, p, token=token).get_json()["scan"]["sku"] for p in
             sorted((assets.more / "scans" / "vases" / "VAS-004").glob("*.jpg"))]
    assert found.count("VAS-004") >= 2, found


def test_captures_are_bounded_per_session_and_can_be_discarded(make_rig) -> None:
    rig = make_rig(settings={"CAPTURE_LIMIT": 3})
    token = rig.login()
    json_post = {"X-CSRF-Token": token, "Accept": "application/json"}
    wait_until(lambda: rig.kiosk.health()["fps"] > 0, 10, "the kiosk's first frames")
    for n in (1, 2, 3):
        r = rig.client.post("/staff/enrol/captures", headers=json_post)
        assert r.status_code == 200 and len(r.get_json()["captures"]) == n
    r = rig.client.post("/staff/enrol/captures", headers=json_post)
    assert r.status_code == 409 and r.get_json() == {
        "error": "at most 3 captures: discard one first"}
    other = rig.app.test_client()  # another staff member's session sees none of them
    rig.login(other)
    assert other.get("/staff/enrol/captures/1.jpg").status_code == 404
    r = rig.client.post("/staff/enrol/captures/2/discard", headers=json_post)
    assert [c["n"] for c in r.get_json()["captures"]] == [1, 3]
    r = rig.client.post("/staff/enrol/captures/2/discard", headers=json_post)
    assert r.status_code == 404 and r.get_json() == {"error": "no capture 2"}
    r = rig.client.post("/staff/enrol/captures", headers=json_post)
    assert [c["n"] for c in r.get_json()["captures"]] == [1, 3, 4]
    # the page's form without JavaScript: redirect, and the message on the page
    r = rig.client.post("/staff/enrol/captures", data={"csrf_token": token},
                        headers={"Accept": "text/html"}, follow_redirects=True)
    assert "at most 3 captures: discard one first" in r.get_data(as_text=True)
    root = rig.app.extensions["storyscan"].captures.root
    assert len(list(root.rglob("*.jpg"))) == 3
    r = rig.client.post("/staff/enrol/captures/clear", headers=json_post)
    assert r.get_json()["captures"] == [] and not list(root.rglob("*.jpg"))
    assert rig.client.post("/staff/enrol/captures", data={}).status_code == 403  # no CSRF token
    rig.app.extensions["storyscan"].close()  # the kiosk stops: its captures go with it
    assert not root.exists()


def test_captures_left_idle_expire() -> None:
    store = Captures(limit=2, ttl_s=0.5)
    assert store.add("a", b"\xff\xd8 one") == 1
    time.sleep(0.3)
    assert store.add("b", b"\xff\xd8 two") == 1
    time.sleep(0.3)  # a idle for 0.6 s, b for 0.3 s
    assert store.read("b", 1) == b"\xff\xd8 two"
    assert store.numbers("a") == [] and not (store.root / "a").exists()
    assert store.numbers("b") == [1]
    root = store.root
    store.close()
    assert not root.exists()


def test_a_capture_before_the_camera_gave_a_picture_says_so(make_rig) -> None:
    rig = make_rig(run=False)  # the kiosk's loop has seen no frame
    token = rig.login()
    r = rig.client.post("/staff/enrol/captures",
                        headers={"X-CSRF-Token": token, "Accept": "application/json"})
    assert r.status_code == 503
    assert r.get_json()["error"].startswith("cannot capture: no picture from the camera yet")
    no_trace(r)
    r = rig.client.post("/staff/enrol/captures", data={"csrf_token": token},
                        headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/staff/enrol")
    page = rig.client.get("/staff/enrol").get_data(as_text=True)
    assert "no picture from the camera yet" in page
    r = rig.client.post("/staff/enrol", data={"sku": "VAS-004", "name": "Vase",
                                              "category": "vases", "csrf_token": token},
                        follow_redirects=True)
    assert "add at least one photo of the product" in r.get_data(as_text=True)


# --- errors and the API's description ----------------------------------------------------------


def test_errors_are_json_with_their_status_and_never_a_traceback(
        trained_demo: TrainedDemo, assets: Assets, tmp_path: Path) -> None:
    rig = Rig(trained_demo, tmp_path, f"dir:{assets.counter}?fps=10", run=False)
    try:
        @rig.app.get("/boom")
        def boom():
            raise RuntimeError("secret internal detail")

        r = rig.client.get("/boom")
        assert r.status_code == 500 and r.get_json() == {
            "error": "internal error: the kiosk logged it"}
        assert "secret" not in r.get_data(as_text=True)
        r = rig.client.get("/boom", headers={"Accept": "text/html"})
        assert r.status_code == 500 and "secret" not in r.get_data(as_text=True)
        no_trace(r)
        r = rig.client.get("/nowhere")
        assert r.status_code == 404 and r.get_json() == {"error": "not found"}
        r = rig.client.get("/nowhere", headers={"Accept": "text/html,*/*;q=0.8"})
        assert r.status_code == 404 and r.mimetype == "text/html"
        assert 'id="error-message"' in r.get_data(as_text=True)
        r = rig.client.get("/api/scans/1/correction")
        assert r.status_code == 405 and r.get_json() == {"error": "method not allowed"}
        assert "POST" in r.headers["Allow"]
        r = rig.client.get("/api/scans?limit=lots")
        assert r.status_code == 400 and r.get_json()["error"].startswith("limit:")
        r = rig.client.post("/api/scans/1/correction", data="{not json",
                            content_type="application/json",
                            headers={"X-CSRF-Token": rig.csrf()})
        assert r.status_code == 400 and r.get_json() == {"error": "send a JSON object"}
        # uploads wait for the kiosk's thread; with its loop stopped they fail, and say so
        rig.app.config["UPLOAD_TIMEOUT_S"] = 0.5
        r = upload(rig, next((trained_demo.data / "scans").rglob("*.jpg")))
        assert r.status_code == 503 and "in time" in r.get_json()["error"]
    finally:
        rig.stop()


def test_the_openapi_document_describes_every_api_route(rig: Rig) -> None:
    doc = rig.client.get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    routes = {}
    for rule in rig.app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(
                m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    described = {path: set(ops) for path, ops in doc["paths"].items()}
    assert described == routes
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"] and op["summary"], (path, method)
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), (path, method)
            if method in ("post", "delete"):
                assert "X-CSRF-Token" in {p["name"] for p in op["parameters"]}, (path, method)
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])


# --- the inventory store itself ----------------------------------------------------------------


def test_inventory_store_rules(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "scans.db")
    session = inv.start("  Spring   count ")
    assert session["name"] == "Spring count" and session["open"]
    assert inv.count_scan("shopper", str(session["id"]), "PLT-001") is None
    assert inv.count_scan("inventory", "99", "PLT-001") is None  # not the open session
    assert inv.count_scan("inventory", str(session["id"]), None) is None  # unknown item
    assert inv.count_scan("inventory", str(session["id"]), "PLT-001") == 1
    assert inv.adjust(session["id"], "VAS-001", 1) == 1
    with pytest.raises(InventoryError, match="not a valid SKU"):
        inv.adjust(session["id"], "=HYPERLINK", 1)
    # names that a spreadsheet would run as formulas are quoted
    exported = inv.export_csv(session["id"], {"PLT-001": "=HYPERLINK(x)", "VAS-001": "@SUM(A1)"})
    assert "'=HYPERLINK(x)" in exported and "'@SUM(A1)" in exported
    with pytest.raises(InventoryError):
        inv.start("")
    for text, message in (("sku,expected\nPLT-001\n", "line 2"), ("PLT-001,-1\n", "line 1"),
                          ("a b,1\n", "not a valid SKU"), ("\n\n", "no 'sku,expected'")):
        with pytest.raises(InventoryError, match=message):
            parse_expected_csv(text)
    assert parse_expected_csv("\ufeffSKU,Expected,note\nPLT-001, 3 ,x\n") == [("PLT-001", 3)]


# --- the command line --------------------------------------------------------------------------


def storyscan_exe() -> str:
    return str(Path(sys.executable).with_name("storyscan"))


def test_kiosk_pin_command_stores_only_a_hash(tmp_path: Path) -> None:
    config = tmp_path / "kiosk.json"
    done = subprocess.run([storyscan_exe(), "kiosk-pin", "--ui-config", str(config),
                           "--pin-stdin"], input="975310\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    stored = load(config)
    assert "975310" not in config.read_text() and check_pin(stored, "975310")
    assert not check_pin(stored, "975311") and config.stat().st_mode & 0o777 == 0o600
    bad = subprocess.run([storyscan_exe(), "kiosk-pin", "--ui-config", str(config),
                          "--pin-stdin"], input="12ab\n", capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "storyscan: error: the staff PIN must be 4 to 12 digits")
    assert check_pin(load(config), "975310")  # unchanged
    with pytest.raises(ConfigError):
        set_pin(config, "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_storyscan_kiosk_serves_the_ui(trained_demo: TrainedDemo, assets: Assets,
                                       tmp_path: Path) -> None:
    catalog = copy_catalog(trained_demo, tmp_path)
    bad = subprocess.run([storyscan_exe(), "kiosk", "--camera", f"dir:{assets.counter}",
                          "--bundle", str(trained_demo.bundle), "--catalog", str(catalog),
                          "--ui", "localhost:http"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "expected HOST:PORT" in bad.stderr
    port = free_port()
    proc = subprocess.Popen(
        [storyscan_exe(), "kiosk", "--camera", f"dir:{assets.counter}", "--bundle",
         str(trained_demo.bundle), "--catalog", str(catalog), "--ui", f"127.0.0.1:{port}",
         "--health-every", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("kiosk UI: http://"):
                break
        assert lines and lines[-1].startswith(f"kiosk UI: http://localhost:{port}/"), lines
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/", timeout=30) as r:
            assert r.status == 200 and b'id="idle"' in r.read()
        with urllib.request.urlopen(f"{base}/api/catalog", timeout=30) as r:
            assert json.loads(r.read())["products"] == 12
        with urllib.request.urlopen(f"{base}/preview.mjpg", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            assert r.read(7) == b"--frame"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "kiosk stopped" in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (tmp_path / "kiosk.json").is_file()
