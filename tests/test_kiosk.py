"""The running kiosk on a synthetic scan video: one scan per placement, durable, never down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.camera import Camera
from device.kiosk import Kiosk
from device.pipeline import Pipeline
from device.scans import ScanLog
from tests.conftest import ROOT, TrainedDemo, copy_catalog
from trainer.synthetic import Placement, plan_products, write_scan_video

PLACEMENTS = 10


@pytest.fixture(scope="module")
def scan_video(trained_demo: TrainedDemo, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, list[Placement]]:
    """The demo's 12 products (same seed as the trained model) visiting a 640x360 counter."""
    path = tmp_path_factory.mktemp("video") / "scan.avi"
    plan = write_scan_video(path, plan_products(12, seed=7), placements=PLACEMENTS, width=640,
                            height=360, fps=12, seed=7, gap_s=1.0, move_s=0.5, hold_s=1.5)
    return path, plan


@pytest.mark.slow
def test_one_scan_per_placement_and_the_right_product(trained_demo: TrainedDemo, scan_video,
                                                      tmp_path: Path) -> None:
    video, plan = scan_video
    frames = json.loads(Path(f"{video}.json").read_text())
    total = plan[-1].removed + 30
    pipeline = Pipeline.open(trained_demo.bundle, copy_catalog(trained_demo, tmp_path))
    camera = Camera(f"{video}?fps=0")  # lockstep: the kiosk sees every frame once
    kiosk = Kiosk(camera, pipeline, ScanLog(tmp_path / "scans.db"))
    heard = []
    kiosk.subscribe(heard.append)
    triggered = []  # (frame index, scan)
    with camera:
        last = 0
        while last < total:
            frame = camera.latest(after=last, timeout=10)
            assert frame is not None
            last = frame.seq
            scan = kiosk.step(frame)
            if scan is not None:
                triggered.append((frame.seq - 1, scan))
    assert frames["placements"][0]["sku"] == plan[0].sku
    # exactly one scan inside each placement's resting time, none anywhere else
    per_placement = [[s for f, s in triggered if p.placed <= f < p.removed] for p in plan]
    assert [len(s) for s in per_placement] == [1] * PLACEMENTS, [f for f, _ in triggered]
    assert len(triggered) == PLACEMENTS
    right = sum(s[0].result.sku == p.sku for s, p in zip(per_placement, plan, strict=True))
    assert right >= 0.9 * PLACEMENTS
    assert not any(s.centre_fallback for _, s in triggered)
    assert [s.id for s in heard] == [s.id for _, s in triggered]
    stored = kiosk.scans.recent(PLACEMENTS)
    assert sorted(r["id"] for r in stored) == [s.id for _, s in triggered]
    assert {"capture", "presence", "crop", "preprocess", "inference", "match"} <= set(
        json.loads(stored[0]["timings"]))
    health = kiosk.health()
    assert health["fps"] > 0 and health["latency_p95_ms"] >= health["latency_p50_ms"] > 0
    assert health["engine"]["backend"] == "onnxruntime"


def test_a_failing_listener_does_not_stop_the_kiosk(trained_demo: TrainedDemo, scan_video,
                                                    tmp_path: Path) -> None:
    video, _ = scan_video
    pipeline = Pipeline.open(trained_demo.bundle, copy_catalog(trained_demo, tmp_path))
    camera = Camera(f"{video}?fps=0")
    kiosk = Kiosk(camera, pipeline, ScanLog(tmp_path / "scans.db"))

    def broken(scan) -> None:
        raise RuntimeError("the UI went away")

    heard = []
    kiosk.subscribe(broken)
    unsubscribe = kiosk.subscribe(heard.append)
    with camera:
        assert kiosk.run(max_scans=2, duration=60) == 2
    assert len(heard) == 2 and len(kiosk.scans) == 2
    unsubscribe()
    assert kiosk.health()["scans_recorded"] == 2


def kiosk_process(trained_demo: TrainedDemo, camera: str, catalog: Path, *extra: str
                  ) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("storyscan")
    return subprocess.Popen(
        [str(exe), "kiosk", "--camera", camera, "--bundle", str(trained_demo.bundle),
         "--catalog", str(catalog), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_sigkill_mid_run_loses_no_recorded_scan(trained_demo: TrainedDemo, scan_video,
                                                tmp_path: Path) -> None:
    video, _ = scan_video
    catalog = copy_catalog(trained_demo, tmp_path)
    proc = kiosk_process(trained_demo, f"{video}?fps=0", catalog)
    printed = []
    try:
        for line in proc.stdout:  # each line is printed after its scan was committed
            printed.append(json.loads(line)["id"])
            if len(printed) == 3:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(printed) == 3, proc.stderr.read()
    assert set(printed) <= ScanLog(tmp_path / "scans.db").ids()


@pytest.mark.slow
def test_kiosk_stays_up_without_a_camera_and_stops_cleanly(trained_demo: TrainedDemo,
                                                           tmp_path: Path) -> None:
    catalog = copy_catalog(trained_demo, tmp_path)
    proc = kiosk_process(trained_demo, f"dir:{tmp_path / 'unplugged'}", catalog,
                         "--health-every", "0.5")
    time.sleep(6)  # model loading, then retries with backoff
    assert proc.poll() is None  # still serving
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "reconnecting" in err and "no such folder" in err
    assert '"state": "reconnecting"' in err or '"state": "failed"' in err  # health says so
    assert "kiosk stopped: 0 scans recorded" in err


def test_an_uploaded_photo_is_recognised_on_the_kiosk_thread_and_can_be_corrected(
        trained_demo: TrainedDemo, scan_video, tmp_path: Path) -> None:
    import threading

    from models.preprocess import load_image

    video, _ = scan_video
    pipeline = Pipeline.open(trained_demo.bundle, copy_catalog(trained_demo, tmp_path))
    camera = Camera(f"{video}?fps=0")
    kiosk = Kiosk(camera, pipeline, ScanLog(tmp_path / "scans.db"))
    photo = next((trained_demo.data / "scans").rglob("*.jpg"))
    with camera:
        worker = threading.Thread(target=kiosk.run, kwargs={"duration": 60})
        worker.start()
        try:
            scan = kiosk.submit(load_image(photo)).result(timeout=30)
        finally:
            kiosk.stop()
            worker.join()
    assert scan.mode == "upload" and scan.centre_fallback
    assert scan.result.sku == photo.parent.name
    log = ScanLog(tmp_path / "scans.db")  # another connection, as the UI's thread has
    log.correct(scan.id, "PLT-002")
    assert log.corrections()[0].items() >= {"scan_id": scan.id, "recognised": scan.result.sku,
                                            "actual": "PLT-002"}.items()
    with pytest.raises(KeyError):
        log.correct(999_999, "PLT-002")
