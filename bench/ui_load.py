"""Load check of the kiosk UI: 50 concurrent clients on the JSON status and scan-result
endpoints for 30 s on loopback, while the kiosk loop scans the demo scan video at its native
frame rate; the loop's speed with and without the load.

    python bench/ui_load.py                       # builds a small demo model first (~2 min)
    python bench/ui_load.py --work /tmp/uiload    # ... kept there and reused by the next run
    python bench/ui_load.py --bundle demo/bundle --catalog demo/catalog.db \
        --camera demo/data/scan_video.avi

The kiosk is a real `storyscan kiosk --ui 127.0.0.1:PORT` process (on a copy of the catalog, so
the bench sets its own staff PIN and scan log); the clients are threads of this process, each
with its own keep-alive connection, cycling through `GET /api/status` (staff: the bench logs in
once and shares the session cookie), `GET /api/scans?limit=20` (recent scans) and
`GET /api/scans/<id>` (the newest scan as its result card). The kiosk's own screen stays open
throughout, as in a shop: one Server-Sent Events stream (/events) and the live preview
(/preview.mjpg).

Two phases of the same length: no clients, then the clients. During both, /api/status is read
once a second for the loop's fps (the kiosk's health statistics, their window shortened from
60 s to `--window` seconds in the bench's kiosk process so that each phase is measured on its
own: only readings whose whole window lies inside the phase count) and the camera's frame
counter; scan latency comes from the scan log's rows recorded in each phase.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import add_docs_args, write_docs  # noqa: E402
from models.tables import format_markdown_table, format_table  # noqa: E402

PIN = "8642"
# `storyscan kiosk` itself, with the health window shortened (see the module docstring)
KIOSK = ("import sys, device.kiosk as k; k.WINDOW_S = float(sys.argv.pop(1)); "
         "from device.cli import main; sys.exit(main(sys.argv[1:]))")
ENDPOINTS = ("/api/status", "/api/scans?limit=20", "/api/scans/{id}")
LOAD_COLUMNS = ["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
LOOP_COLUMNS = ["phase", "loop fps", "loop fps min", "camera fps", "scans",
                "scan p50 ms", "scan p95 ms", "cards pushed", "preview fps", "kiosk CPU %",
                "machine CPU %"]


# --- the demo model --------------------------------------------------------------------------


def build_demo(root: Path) -> tuple[Path, Path, Path]:
    """tests/conftest.py's trained demo (12 synthetic products, trained and exported for real)
    plus the demo's 1280x720 scan video at 15 fps; returns (bundle, catalog, video)."""
    from device.catalog import Catalog
    from device.importers import read_products
    from device.pipeline import Pipeline
    from trainer.config import TrainConfig
    from trainer.export import ExportConfig, export
    from trainer.synthetic import generate_demo, plan_products, write_scan_video
    from trainer.train import train

    bundle, catalog, video = root / "bundle", root / "catalog.db", root / "scan_video.avi"
    if (bundle / "manifest.json").is_file() and catalog.is_file() and video.is_file():
        return bundle, catalog, video
    print(f"building a small demo model in {root} (about 2 minutes)", flush=True)
    generate_demo(root / "data", products=12, train=20, val=5, scans=8, size=160, seed=7)
    best = train(TrainConfig(data=str(root / "data"), out=str(root / "run"), size=112,
                             epochs=5, batch_size=24, lr=0.02, seed=0))
    export(ExportConfig(checkpoint=str(best), data=str(root / "data"), out=str(bundle),
                        name="uiload", version="1", calibration_photos=96, min_agreement=0.95))
    Catalog(catalog).upsert(read_products(root / "data" / "catalog"))
    Pipeline.open(bundle, catalog)  # the reference embeddings
    write_scan_video(video, plan_products(12, seed=7), placements=8, seed=7)  # as demo-data
    return bundle, catalog, video


def copy_catalog(catalog: Path, dest: Path) -> Path:
    """The catalog through SQLite's backup API (the file alone may miss WAL pages), with its
    media folder, so the bench's scan log and staff PIN live beside the copy."""
    db = dest / "catalog.db"
    with sqlite3.connect(catalog) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    media = catalog.with_name(f"{catalog.stem}-media")
    if media.is_dir():
        shutil.copytree(media, dest / "catalog-media")
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- HTTP ------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection; `get` returns (status, body, seconds)."""

    def __init__(self, port: int, cookie: str = "") -> None:
        self.port, self.cookie, self.conn = port, cookie, None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        for attempt in (0, 1):  # the server may close an idle connection: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request(method, path, body, {
                    "Accept": "application/json", **({"Cookie": self.cookie} if self.cookie
                                                     else {}), **(headers or {})})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, data, response
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        status, data, _ = self.request("GET", path)
        return status, data, time.perf_counter() - t0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def staff_cookie(port: int) -> str:
    """Log in with the PIN through the API; the session cookie that says so."""
    client = Client(port)
    status, data, response = client.request("GET", "/api/session")
    cookie = response.getheader("Set-Cookie", "").split(";", 1)[0]
    client.cookie = cookie
    token = json.loads(data)["csrf_token"]
    status, data, response = client.request(
        "POST", "/api/session", json.dumps({"pin": PIN}).encode(),
        {"Content-Type": "application/json", "X-CSRF-Token": token})
    if status != 200:
        raise SystemExit(f"bench: staff login failed ({status}): {data[:200]!r}")
    client.close()
    return response.getheader("Set-Cookie", cookie).split(";", 1)[0]


# --- the kiosk's own screen and the status sampler ---------------------------------------------


class Screen(threading.Thread):
    """The kiosk's display: the event stream (counting scan cards) or the MJPEG preview
    (counting frames), with the time of each."""

    def __init__(self, port: int, path: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.stop = port, path, stop
        self.times: list[float] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        marker = b"event: scan" if self.path == "/events" else b"--frame"
        buffer = b""
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            while not self.stop.is_set():
                chunk = response.read1(65536)
                if not chunk:
                    break
                buffer += chunk
                while (at := buffer.find(marker)) >= 0:
                    self.times.append(time.monotonic())
                    buffer = buffer[at + len(marker):]
                buffer = buffer[-len(marker):]
        except (OSError, http.client.HTTPException):
            pass  # the kiosk stopped
        finally:
            conn.close()


class Sampler(threading.Thread):
    """/api/status once a second: (time, loop fps, camera frames)."""

    def __init__(self, port: int, cookie: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.stop = Client(port, cookie), stop
        self.samples: list[tuple[float, float, int]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            status, data, _ = self.client.get("/api/status")
            if status == 200:
                s = json.loads(data)
                self.samples.append((time.monotonic(), s["fps"], s["camera"]["frames"]))
            self.stop.wait(1.0)
        self.client.close()


# --- the load --------------------------------------------------------------------------------


def load(port: int, cookie: str, clients: int, seconds: float, first_id: int
         ) -> dict[str, list]:
    """`clients` threads, each cycling through ENDPOINTS on its own connection for `seconds`;
    per endpoint, the list of (seconds, ok)."""
    results: dict[str, list] = {e: [] for e in ENDPOINTS}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        c = Client(port, cookie)
        mine: dict[str, list] = {e: [] for e in ENDPOINTS}
        newest, k = first_id, i  # the clients start at different endpoints
        start.wait()
        while time.monotonic() < deadline[0]:
            endpoint = ENDPOINTS[k % len(ENDPOINTS)]
            k += 1
            try:
                status, data, took = c.get(endpoint.format(id=newest))
                ok = status == 200
                if ok and endpoint.startswith("/api/scans?"):
                    scans = json.loads(data)["scans"]
                    newest = scans[0]["id"] if scans else newest
            except Exception:
                took, ok = 0.0, False
            mine[endpoint].append((took, ok))
        c.close()
        with lock:
            for e, got in mine.items():
                results[e] += got

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    start.wait()
    for t in threads:
        t.join(timeout=seconds + 60)
    return results


def load_rows(results: dict[str, list], seconds: float) -> list[dict]:
    rows = []
    everything = [r for got in results.values() for r in got]
    for name, got in [*results.items(), ("all", everything)]:
        times = np.array([t for t, ok in got if ok]) * 1e3
        p50, p95, p99 = np.percentile(times, [50, 95, 99]) if len(times) else (np.nan,) * 3
        rows.append({"endpoint": name, "requests": len(got),
                     "req/s": len(got) / seconds, "p50 ms": p50, "p95 ms": p95,
                     "p99 ms": p99, "errors": sum(not ok for _, ok in got)})
    return rows


def phase_row(name: str, t0: float, t1: float, window: float, samples, scans, cards,
              frames, cpu: tuple[float, float]) -> dict:
    """The loop's figures for the phase [t0, t1) (monotonic times)."""
    whole = [s for s in samples if t0 + window <= s[0] <= t1]  # windows inside the phase
    inside = [s for s in samples if t0 <= s[0] <= t1]
    fps = [s[1] for s in whole]
    camera = ((inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])
              if len(inside) > 1 else np.nan)
    latencies = [ms for t, ms in scans if t0 <= t < t1]
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (np.nan, np.nan)
    return {"phase": name, "loop fps": np.mean(fps) if fps else np.nan,
            "loop fps min": min(fps) if fps else np.nan, "camera fps": camera,
            "scans": len(latencies), "scan p50 ms": p50, "scan p95 ms": p95,
            "cards pushed": sum(t0 <= t < t1 for t in cards),
            "preview fps": sum(t0 <= t < t1 for t in frames) / (t1 - t0),
            "kiosk CPU %": cpu[0], "machine CPU %": cpu[1]}


class CpuMeter:
    """CPU use between `start()` and `stop()`: the kiosk process (100% = one core) and the
    whole machine."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)

    def start(self) -> None:
        self.process.cpu_percent(None)
        psutil.cpu_percent(None)

    def stop(self) -> tuple[float, float]:
        return self.process.cpu_percent(None), psutil.cpu_percent(None)


def scan_times(scans_db: Path, wall0: float, mono0: float) -> list[tuple[float, float]]:
    """(monotonic time, latency ms) of every recorded scan."""
    with sqlite3.connect(scans_db) as db:
        rows = db.execute("SELECT time, latency_ms FROM scans").fetchall()
    out = []
    for stamp, ms in rows:
        wall = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        out.append((wall - wall0 + mono0, ms))
    return out


def reading(total: dict, quiet: dict, busy: dict, clients: int) -> str:
    """What the tables say, in words (from this run's numbers)."""
    pushed = (f"every scan reached the screen ({busy['cards pushed']} cards for "
              f"{busy['scans']} scans)" if busy["cards pushed"] == busy["scans"] else
              f"{busy['cards pushed']} of its {busy['scans']} scans reached the screen")
    return (
        f"Under the load the loop kept {busy['loop fps'] / quiet['loop fps']:.1%} of its "
        f"frame rate ({busy['loop fps']:.2f} fps against {quiet['loop fps']:.2f}, the camera "
        f"giving {busy['camera fps']:.2f}) and {pushed}; what the load costs the "
        f"shopper is scan latency, p95 {quiet['scan p95 ms']:.0f} ms without it and "
        f"{busy['scan p95 ms']:.0f} ms with it, the request threads sharing the kiosk "
        "process's interpreter lock and the two cores with the loop. The clients send "
        "their next request as soon as an answer arrives, so the server runs flat out and a "
        f"response waits its turn: about {clients} / {total['req/s']:.0f} req/s = "
        f"{clients / total['req/s'] * 1e3:.0f} ms on average; {total['errors']} errors.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--catalog", type=Path)
    p.add_argument("--camera", help="the kiosk's camera (default: the demo scan video)")
    p.add_argument("--work", type=Path, help="where to build (and keep) the demo model; "
                   "default: a temporary folder")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    p.add_argument("--window", type=float, default=10.0,
                   help="the kiosk's health window in this bench, seconds")
    add_docs_args(p)
    args = p.parse_args()
    if (args.bundle is None) != (args.catalog is None):
        p.error("give both --bundle and --catalog, or neither (the bench builds a demo)")

    with tempfile.TemporaryDirectory(prefix="uiload-") as tmp:
        tmp = Path(tmp)
        if args.bundle is None:
            work = args.work or tmp / "demo"
            work.mkdir(parents=True, exist_ok=True)
            bundle, catalog, video = build_demo(work)
            camera = args.camera or str(video)
        else:
            bundle, catalog = args.bundle, args.catalog
            camera = args.camera or str(catalog.parent / "data" / "scan_video.avi")
        shop = tmp / "kiosk"
        shop.mkdir()
        db = copy_catalog(catalog, shop)
        exe = Path(sys.executable).with_name("storyscan")
        subprocess.run([str(exe), "kiosk-pin", "--catalog", str(db), "--pin-stdin"],
                       input=f"{PIN}\n", text=True, check=True, capture_output=True)
        port = free_port()
        log = (tmp / "kiosk.log").open("w")
        load_before = os.getloadavg()[0]
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"kiosk on {camera}", flush=True)
        kiosk = subprocess.Popen(
            [sys.executable, "-c", KIOSK, str(args.window), "kiosk", "--camera", camera,
             "--bundle", str(bundle), "--catalog", str(db), "--ui", f"127.0.0.1:{port}",
             "--health-every", "0"], stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stop = threading.Event()
        try:
            deadline = time.monotonic() + 120
            while "kiosk UI: http://" not in (tmp / "kiosk.log").read_text():
                if kiosk.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench: the kiosk did not start:\n"
                                     + (tmp / "kiosk.log").read_text()[-2000:])
                time.sleep(0.2)
            cookie = staff_cookie(port)
            wall0, mono0 = time.time(), time.monotonic()
            sampler = Sampler(port, cookie, stop)
            screens = [Screen(port, "/events", stop), Screen(port, "/preview.mjpg", stop)]
            for t in [sampler, *screens]:
                t.start()
            time.sleep(args.window + 2)  # warm up: a full health window of the loop
            cpu = CpuMeter(kiosk.pid)
            quiet0 = time.monotonic()
            cpu.start()
            time.sleep(args.seconds)
            quiet_cpu = cpu.stop()
            quiet1 = time.monotonic()
            status, data, _ = Client(port, cookie).get("/api/scans?limit=1")
            scans = json.loads(data)["scans"] if status == 200 else []
            print(f"quiet phase done; {args.clients} clients for {args.seconds:.0f} s",
                  flush=True)
            busy0 = time.monotonic()
            cpu.start()
            results = load(port, cookie, args.clients, args.seconds,
                           scans[0]["id"] if scans else 1)
            busy_cpu = cpu.stop()
            busy1 = time.monotonic()
            time.sleep(1.5)  # the sampler's last reading of the busy phase
            stop.set()
        finally:
            kiosk.send_signal(signal.SIGINT)
            try:
                kiosk.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kiosk.kill()
            log.close()
        recorded = scan_times(shop / "scans.db", wall0, mono0)
        fps_of_video = None
        meta = Path(f"{camera}.json")
        if meta.is_file():
            fps_of_video = json.loads(meta.read_text()).get("fps")

    load_table = load_rows(results, busy1 - busy0)
    loop_table = [
        phase_row("no clients", quiet0, quiet1, args.window, sampler.samples, recorded,
                  screens[0].times, screens[1].times, quiet_cpu),
        phase_row(f"{args.clients} clients", busy0, busy1, args.window, sampler.samples,
                  recorded, screens[0].times, screens[1].times, busy_cpu)]
    load_formats = {"req/s": ".0f", "p50 ms": ".1f", "p95 ms": ".1f", "p99 ms": ".1f"}
    loop_formats = {"loop fps": ".2f", "loop fps min": ".2f", "camera fps": ".2f",
                    "scan p50 ms": ".0f", "scan p95 ms": ".0f", "preview fps": ".1f",
                    "kiosk CPU %": ".0f", "machine CPU %": ".0f"}
    print(format_table(load_table, LOAD_COLUMNS, load_formats))
    print(format_table(loop_table, LOOP_COLUMNS, loop_formats))
    if not args.no_docs:
        video = f" ({fps_of_video:g} fps)" if fps_of_video else ""
        body = (
            f"{args.clients} client threads (one keep-alive connection each, in the bench's "
            f"own process) for {args.seconds:.0f} s on loopback against `storyscan kiosk --ui`, "
            f"whose loop scans {'the demo scan video' if args.camera is None else camera}"
            f"{video} at its own frame rate, on the same machine; each client cycles through "
            "the staff status JSON, the recent scans and the newest scan's result card, "
            "back to back with no pause. The kiosk's own screen (event stream and live "
            f"preview) is open throughout. Load average before the run: {load_before:.2f}."
            "\n\n"
            + format_markdown_table(load_table, LOAD_COLUMNS, load_formats)
            + "\n\nThe kiosk loop in the same run: first with no clients, then under the load "
            f"above ({args.seconds:.0f} s each). Loop fps: the kiosk's health figure (frames "
            f"processed per second over a {args.window:g} s window, readings whose window lies "
            "inside the phase: mean and lowest); camera fps: frames the camera delivered; "
            "scans and their latency (camera frame to recorded result) from the scan log; "
            "cards pushed: scan cards the screen's event stream received; CPU: the kiosk "
            "process (100% = one core) and the whole machine (all cores, the clients "
            "included).\n\n"
            + format_markdown_table(loop_table, LOOP_COLUMNS, loop_formats)
            + "\n\n" + reading(load_table[-1], *loop_table, args.clients))
        write_docs(args, "ui_load", "Kiosk UI under load", body)


if __name__ == "__main__":
    main()
