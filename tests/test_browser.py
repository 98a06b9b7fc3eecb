"""The kiosk UI in a real browser: Debian's chromium, headless, driven by Playwright, against a
real `storyscan kiosk --ui` process on the trained demo model and catalog, its camera a scan
video played at its own frame rate (a product set on the counter, held, taken away, again).

Two flows: the shopper's (the card pushed by Server-Sent Events with the right product and its
story, the language switch, "Not this one?" recorded as a correction, back to idle after the
card's timeout, an unknown item) and the staff's (PIN login, an inventory session counting the
camera's scans, +/- by hand, expected counts imported, the discrepancy view, the CSV export,
close). Every screen is photographed at a kiosk's 1280x800: into the test's temporary folder,
or into $STORYSCAN_SCREENSHOTS (`STORYSCAN_SCREENSHOTS=docs/screenshots` refreshes the README's).

`make test` installs chromium (Debian's chromium and chromium-driver) and Playwright (the
`test` extra; its own browser downloads are never used); without them these tests are skipped,
saying which is missing. $STORYSCAN_CHROMIUM points at another chromium binary.
"""

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
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.scans import ScanLog
from kiosk_ui.config import load as load_config
from kiosk_ui.config import save as save_config
from tests.conftest import ROOT, TrainedDemo, copy_catalog
from trainer.synthetic import plan_products, write_scan_video

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the `test` extra not installed
    sync_playwright = None

CHROMIUM = Path(os.environ.get("STORYSCAN_CHROMIUM", "/usr/bin/chromium"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"chromium not installed ({CHROMIUM}; "
                       "'make test' installs Debian's chromium and chromium-driver)"),
    pytest.mark.skipif(sync_playwright is None,
                       reason="playwright not installed (pip install -e '.[test]')"),
]

PIN = "5791"
PRODUCT = "VAS-001"  # the product the scan video sets on the counter, again and again
CARD_SECONDS = 5  # the shopper's card goes back to idle after this (kiosk.json)
HOLD_S = 18.0  # how long the product rests on the counter: one scan per visit
VIEWPORT = {"width": 1280, "height": 800}


@dataclass(frozen=True)
class RunningKiosk:
    url: str
    folder: Path
    catalog: Path
    counter_photo: Path  # a plain gradient, no product: an item the kiosk does not know

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}api/{path}", timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def kiosk(trained_demo: TrainedDemo, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningKiosk]:
    """`storyscan kiosk --ui 127.0.0.1:PORT` on a copy of the demo catalog, the staff PIN set
    with `storyscan kiosk-pin` and a short card timeout in the UI config (kiosk.json)."""
    folder = tmp_path_factory.mktemp("browser")
    catalog = copy_catalog(trained_demo, folder)
    product = next(p for p in plan_products(12, seed=7) if p.sku == PRODUCT)
    video = folder / "counter.avi"
    write_scan_video(video, [product], placements=1, width=640, height=360, fps=12, seed=7,
                     gap_s=1.0, move_s=0.5, hold_s=HOLD_S)
    yy, xx = np.mgrid[0:360, 0:640]
    counter = folder / "counter.png"
    cv2.imwrite(str(counter), np.stack([150 + 30 * xx / 640, 140 + 20 * yy / 360,
                                        120 + 0 * xx], -1).astype(np.uint8))
    exe = str(Path(sys.executable).with_name("storyscan"))
    done = subprocess.run([exe, "kiosk-pin", "--catalog", str(catalog), "--pin-stdin"],
                          input=f"{PIN}\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = folder / "kiosk.json"
    save_config(config, {**json.loads(config.read_text()), "card_seconds": CARD_SECONDS,
                         "shop_name": "Delft & Co."})
    assert load_config(config)["card_seconds"] == CARD_SECONDS
    port = free_port()
    log_path = folder / "kiosk.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [exe, "kiosk", "--camera", str(video), "--bundle", str(trained_demo.bundle),
             "--catalog", str(catalog), "--ui", f"127.0.0.1:{port}", "--health-every", "0"],
            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while "kiosk UI: http://" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield RunningKiosk(f"http://127.0.0.1:{port}/", folder, catalog, counter)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log = log_path.read_text()
        assert proc.returncode == 0 and "Traceback" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: $STORYSCAN_SCREENSHOTS, or the test's temporary folder."""
    folder = Path(os.environ.get("STORYSCAN_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Screen:
    """A fresh browser profile at a kiosk's size. It collects script errors and console
    errors (a Content-Security-Policy violation is one) and every response with an error
    status, which each test checks."""

    def __init__(self, browser: Browser, shots: Path) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True,
                                           locale="en-GB", timezone_id="UTC")
        self.context.set_default_timeout(20_000)
        self.page: Page = self.context.new_page()
        self.shots = shots
        self.errors: list[str] = []
        self.failed: list[tuple[int, str]] = []  # (status, path)
        self.page.on("pageerror", lambda e: self.errors.append(f"script: {e}"))
        self.page.on("console", self._console)
        self.page.on("response", lambda r: self.failed.append(
            (r.status, r.url.split("/", 3)[-1])) if r.status >= 400 else None)

    def _console(self, message) -> None:
        # a failed request is also logged without its address: `failed` has it
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] - 1)  # no hover look
        self.page.screenshot(path=str(path), animations="disabled")
        assert path.stat().st_size > 10_000, path  # a picture, not a blank page
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def screen(browser: Browser, shots: Path) -> Iterator[Screen]:
    s = Screen(browser, shots)
    yield s
    s.close()


def words(text: str) -> str:
    return " ".join(text.split())


def loaded(page: Page, selector: str) -> None:
    """Wait until the image at `selector` has arrived and decoded."""
    page.wait_for_function("s => { const i = document.querySelector(s); "
                           "return i && i.complete && i.naturalWidth > 0; }", arg=selector)


# --- the shopper ---------------------------------------------------------------------------------


def test_shopper_scan_story_correction_and_back_to_idle(kiosk: RunningKiosk,
                                                        screen: Screen) -> None:
    page = screen.page
    product = kiosk.api(f"products/{PRODUCT}")
    assert set(product["stories"]) == {"en", "zh"}
    page.goto(kiosk.url, wait_until="domcontentloaded")  # the MJPEG preview never "loads"
    idle, card = page.locator("#idle"), page.locator("#result-card")
    expect(idle).to_be_visible()
    expect(card).to_be_hidden()
    loaded(page, "#preview")  # the live picture of the counter (the kiosk's own screen)
    expect(page.locator("#lang-switch button[data-lang]")).to_have_count(2)
    screen.shot("shopper-idle")

    # the product is set on the counter: the kiosk scans it and pushes the card
    expect(card).to_be_visible(timeout=60_000)
    expect(card).to_have_attribute("data-state", "product")
    expect(card).to_have_attribute("data-sku", PRODUCT)
    expect(idle).to_be_hidden()
    scan_id = int(card.get_attribute("data-scan"))
    expect(page.locator("#card-name")).to_have_text(product["name"])
    expect(page.locator("#card-price")).to_have_text(re.compile(r"€\s?\d"))
    assert words(page.locator("#card-story").inner_text()) == words(product["stories"]["en"])
    loaded(page, "#card-photo")
    assert page.locator("#card-photo").get_attribute("src") == product["photo"]
    scan = kiosk.api(f"scans/{scan_id}")
    assert scan["scan"]["sku"] == PRODUCT and scan["scan"]["mode"] == "shopper"
    screen.shot("shopper-result")

    # the language switch: the story and the screen's own words in Chinese
    page.click("#lang-switch button[data-lang=zh]")
    assert words(page.locator("#card-story").inner_text()) == words(product["stories"]["zh"])
    expect(page.locator("html")).to_have_attribute("lang", "zh")
    expect(page.locator("#not-this")).not_to_have_text("Not this one?")
    screen.shot("shopper-result-zh")
    page.click("#lang-switch button[data-lang=en]")
    expect(page.locator("#not-this")).to_have_text("Not this one?")

    # "Not this one?": the runners-up; a tap records the correction for retraining
    alternatives = page.locator("#alternatives-list button[data-sku]")
    expect(page.locator("#alternatives")).to_be_hidden()
    page.click("#not-this")
    expect(page.locator("#alternatives")).to_be_visible()
    assert alternatives.count() >= 2
    for i in range(alternatives.count()):
        loaded(page, f"#alternatives-list li:nth-child({i + 1}) img")
    screen.shot("shopper-not-this-one")
    right = alternatives.first.get_attribute("data-sku")
    assert right != PRODUCT
    alternatives.first.click()
    tapped = time.monotonic()
    expect(page.locator("#thanks")).to_be_visible()
    expect(page.locator("#card-name")).to_have_text(kiosk.api(f"products/{right}")["name"])
    expect(page.locator("#not-this")).to_be_hidden()
    corrections = ScanLog(kiosk.folder / "scans.db").corrections()
    assert [(c["scan_id"], c["recognised"], c["actual"]) for c in corrections] == [
        (scan_id, PRODUCT, right)]

    # untouched, the card goes back to idle after its timeout
    expect(idle).to_be_visible(timeout=(CARD_SECONDS + 5) * 1000)
    assert time.monotonic() - tapped >= CARD_SECONDS - 1
    expect(card).to_be_hidden()

    # an item the kiosk does not know (a photo uploaded from the screen): a friendly message
    # and its best guesses
    page.set_input_files("#upload-input", str(kiosk.counter_photo))
    expect(card).to_have_attribute("data-state", "unknown")
    expect(page.locator("#card-unknown")).to_be_visible()
    expect(page.locator("#card-product")).to_be_hidden()
    expect(page.locator("#alternatives")).to_be_visible()
    expect(page.locator("#alternatives-title")).to_have_text("Is it one of these?")
    for i in range(alternatives.count()):
        loaded(page, f"#alternatives-list li:nth-child({i + 1}) img")
    screen.shot("shopper-unknown")
    page.click("#done")
    expect(idle).to_be_visible()
    assert not screen.errors and not screen.failed, (screen.errors, screen.failed)


# --- staff -------------------------------------------------------------------------------------


def row(page: Page, sku: str):
    return page.locator(f'#inventory-table tr[data-sku="{sku}"]')


def test_staff_inventory_count_discrepancies_and_export(kiosk: RunningKiosk,
                                                        screen: Screen) -> None:
    page = screen.page
    page.goto(f"{kiosk.url}staff")
    expect(page).to_have_url(re.compile(r"/staff/login"))
    screen.shot("staff-login")
    page.fill("#pin", "0000")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("wrong PIN")
    page.fill("#pin", PIN)
    page.click("#login-submit")
    expect(page).to_have_url(re.compile(r"/staff/?$"))

    # start a session: the kiosk counts every product set in front of its camera
    page.click("#start-session")
    expect(page).to_have_url(re.compile(r"/staff/inventory/\d+$"))
    session = int(page.locator("#session").get_attribute("data-session"))
    expect(page.locator("#counting")).to_be_visible()
    assert kiosk.api("catalog")["products"] == 12
    counted = row(page, PRODUCT).locator(".counted")
    expect(counted).to_have_text(re.compile(r"^[1-9]\d*$"), timeout=60_000)  # a camera scan
    camera_count = int(counted.inner_text())

    # by hand: a product the camera never sees, then +1 and -1 on its row
    page.select_option("#manual-sku", "PLT-001")
    page.fill("#manual-form input[name=delta]", "3")
    page.click("#manual-form button[type=submit]")
    expect(row(page, "PLT-001").locator(".counted")).to_have_text("3")
    page.click('#inventory-table tr[data-sku="PLT-001"] button[aria-label="+1 PLT-001"]')
    expect(row(page, "PLT-001").locator(".counted")).to_have_text("4")
    page.click('#inventory-table tr[data-sku="PLT-001"] button[aria-label="−1 PLT-001"]')
    expect(row(page, "PLT-001").locator(".counted")).to_have_text("3")

    # what the books expect
    page.set_input_files("#import-form input[type=file]", files=[{
        "name": "expected.csv", "mimeType": "text/csv",
        "buffer": f"sku,expected\nPLT-001,3\n{PRODUCT},{camera_count + 5}\nRNG-002,2\n"
                  .encode()}])
    page.click("#import-form button[type=submit]")
    expect(page.locator("#messages")).to_contain_text("Expected counts for 3 products")
    expect(row(page, "RNG-002").locator(".expected")).to_have_text("2")
    expect(row(page, "RNG-002").locator(".difference")).to_have_text("-2")
    expect(row(page, "PLT-001").locator(".difference")).to_have_text("0")
    loaded(page, '#inventory-table tr[data-sku="PLT-001"] img')
    screen.shot("staff-inventory")

    page.click("#discrepancy-view")
    expect(page).to_have_url(re.compile(r"view=discrepancies"))
    expect(row(page, "RNG-002")).to_be_visible()
    expect(row(page, PRODUCT)).to_be_visible()  # counted fewer than expected
    expect(row(page, "PLT-001")).to_have_count(0)  # as expected: not a discrepancy
    screen.shot("staff-discrepancies")

    # the CSV export, downloaded as a file
    with page.expect_download() as download:
        page.click("#export-csv")
    assert re.fullmatch(rf"inventory-{session}-\d{{4}}-\d\d-\d\d\.csv",
                        download.value.suggested_filename)
    rows = {r["sku"]: r for r in csv.DictReader(io.StringIO(
        Path(download.value.path()).read_text(encoding="utf-8")))}
    assert {k: rows[k] for k in ("PLT-001", "RNG-002")} == {
        "PLT-001": {"sku": "PLT-001", "name": kiosk.api("products/PLT-001")["name"],
                    "expected": "3", "counted": "3", "difference": "0"},
        "RNG-002": {"sku": "RNG-002", "name": kiosk.api("products/RNG-002")["name"],
                    "expected": "2", "counted": "0", "difference": "-2"}}
    assert int(rows[PRODUCT]["counted"]) >= camera_count
    assert rows[PRODUCT]["expected"] == str(camera_count + 5)

    # the status page
    page.goto(f"{kiosk.url}status")
    status = page.locator("#status")
    expect(status.locator("[data-field='camera.state']")).to_have_text("ok")
    expect(status.locator("[data-field='engine.backend']")).to_have_text("onnxruntime")
    expect(status.locator("[data-field='mode.mode']")).to_have_text("inventory")
    expect(status.locator("[data-field='catalog.products']")).to_have_text("12")
    assert float(status.locator("[data-field=fps]").inner_text()) > 5
    screen.shot("staff-status")

    # the enrolment form (filled in for its picture; enrolling is tested in test_ui.py)
    page.goto(f"{kiosk.url}staff/enrol")
    page.fill("#enrol-sku", "VAS-042")
    page.fill("#enrol-name", "Night Garden Vase")
    page.fill("#enrol-category", "vases")
    page.fill("#enrol-price", "89.00")
    page.fill("#enrol-story-en", "Thrown in Gouda by the Verhoeven workshop and glazed in "
              "deep blue; every vase carries its maker's mark under the foot.")
    page.fill("#enrol-story-zh", "在豪达的 Verhoeven 工坊拉坯成型，施以深蓝釉；"
              "每只花瓶底部都有匠人的印记。")
    screen.shot("staff-enrol")

    # close the session: the kiosk goes back to the shopper's screen
    page.goto(f"{kiosk.url}staff/inventory/{session}")
    page.click("#close-session")
    expect(page.locator("#messages")).to_contain_text("closed")
    expect(page.locator("#closed")).to_be_visible()
    expect(page.locator("#close-session")).to_have_count(0)
    status = page.request.get(f"{kiosk.url}api/status").json()
    assert status["mode"] == {"mode": "shopper", "session": None}
    assert not screen.errors, screen.errors
    assert screen.failed == [(401, "staff/login")], screen.failed  # the wrong PIN only
