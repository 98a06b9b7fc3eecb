"""Per-scan latency of the kiosk pipeline against a plain PyTorch eager FP32 pipeline.

    python bench/latency.py --data ../shared/data/grocery

For each architecture the script makes a bundle the way `storyscan export` does (weights do not
change the time, so the networks are freshly initialised rather than trained; INT8 is
calibrated on training photos as usual) and a catalog of the data's products, then times one
scan from a 1280x720 camera frame to a result:

- kiosk: presence check -> square crop around the product -> preprocess -> ONNX Runtime
  (INT8 or FP32, flip test-time averaging inside the model as shipped) -> catalog match, i.e.
  device.presence, device.crop and device.pipeline.Pipeline.recognize;
- eager: the frame as a tensor -> resize the shorter side -> centre crop -> normalise ->
  the same network in PyTorch FP32 eager mode under no_grad -> softmax -> top-1 product,
  as the seed projects write inference (one forward pass, no flip).

Frames are a synthetic scan video's (trainer.synthetic) frames with a product held still.
The pipelines are timed alternately frame by frame so machine noise hits them alike; the
table gives p50/p95 and each kiosk variant's speed-up over eager FP32 of the same network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_docs_args, write_docs
from device.catalog import Catalog
from device.crop import product_crop
from device.importers import read_products
from device.pipeline import Pipeline
from device.presence import HELD, Presence
from models.recognizer import build_recognizer, input_spec
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.export import ExportConfig, export
from trainer.ingest import read_layout
from trainer.synthetic import plan_products, scan_video_frames

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
COLUMNS = ["model", "pipeline", "precision", "p50 ms", "p95 ms", "speed-up vs eager"]


def fresh_checkpoint(arch: str, size: int, data: Path, path: Path) -> Path:
    """A checkpoint as `storyscan train` writes it, of an untrained network."""
    labels = read_layout(data)[0]
    model = build_recognizer(arch, len(labels.fine), len(labels.coarse), weights="none")
    torch.save({"model": model.state_dict(),
                "config": asdict(TrainConfig(data=str(data), arch=arch, size=size,
                                             weights="none", epochs=0)),
                "labels": {"fine": labels.fine, "coarse": labels.coarse,
                           "coarse_of_fine": labels.coarse_of_fine, "attributes": [],
                           "attributes_of_fine": [[] for _ in labels.fine]},
                "input": input_spec(arch, size).to_dict(), "epoch": 0, "val": {},
                "best_top1": 0.0, "history": []}, path)
    return path


def held_frames(count: int) -> list[tuple[np.ndarray, Presence]]:
    """1280x720 RGB frames with a product held still, each with the presence model that has
    just seen it (so its foreground box is the product's)."""
    _, frames = scan_video_frames(plan_products(8), placements=4, width=1280, height=720,
                                  fps=15, waves=False)
    presence, held = Presence(), []
    for bgr in frames:
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        if presence.update(rgb).state == HELD:
            held.append(rgb)
    step = max(1, len(held) // count)
    return [(f, presence) for f in held[::step][:count]]


class EagerPipeline:
    """Inference as the seeds write it: whole frame, resize, centre crop, FP32 eager."""

    def __init__(self, model: torch.nn.Module, arch: str, size: int) -> None:
        self.model, self.spec = model.eval(), input_spec(arch, size)
        self.mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        self.std = torch.tensor(self.spec.std).view(3, 1, 1)

    def __call__(self, frame: np.ndarray) -> int:
        with torch.no_grad():
            x = torch.from_numpy(frame).permute(2, 0, 1).float()
            h, w = x.shape[1:]
            scale = self.spec.resize / min(h, w)
            x = F.interpolate(x[None], size=(round(h * scale), round(w * scale)),
                              mode="bilinear", antialias=True, align_corners=False)[0]
            top, left = (x.shape[1] - self.spec.size) // 2, (x.shape[2] - self.spec.size) // 2
            x = x[:, top : top + self.spec.size, left : left + self.spec.size]
            x = (x - self.mean) / self.std
            _, fine, _ = self.model(x[None])
            return int(F.softmax(fine, dim=1).argmax(1))


def kiosk_scan(pipeline: Pipeline, presence: Presence, frame: np.ndarray) -> str | None:
    """Presence check, crop and recognition of one frame, as the kiosk does on a trigger."""
    event = presence.update(frame)
    image, _, _ = product_crop(frame, event.box)
    return pipeline.recognize(np.ascontiguousarray(image)).sku


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--archs", default="efficientnet_lite0,resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--frames", type=int, default=100, help="scans timed per pipeline")
    p.add_argument("--calibration-photos", type=int, default=128)
    add_docs_args(p)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # every core, as ONNX Runtime uses
    frames = held_frames(args.frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        catalog = tmp / "catalog.db"
        Catalog(catalog).upsert(read_products(args.data / "classes.csv")
                                if (args.data / "classes.csv").is_file()
                                else read_products(args.data / "catalog"))
        for arch in args.archs.split(","):
            ckpt = fresh_checkpoint(arch, args.size, args.data, tmp / f"{arch}.pt")
            bundle = tmp / f"{arch}-bundle"
            export(ExportConfig(checkpoint=str(ckpt), data=str(args.data), out=str(bundle),
                                name=arch, calibration_photos=args.calibration_photos,
                                min_agreement=0.0))
            labels = read_layout(args.data)[0]
            network = build_recognizer(arch, len(labels.fine), len(labels.coarse),
                                       weights="none")
            network.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
            eager = EagerPipeline(network, arch, args.size)
            kiosks = {precision: Pipeline.open(bundle, catalog, precision)
                      for precision in ("int8", "fp32")}
            runs = {"eager": eager, **{
                precision: (lambda frame, presence, k=k: kiosk_scan(k, presence, frame))
                for precision, k in kiosks.items()}}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for frame, presence in frames[:3] + frames:  # the first three warm up
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run(frame) if name == "eager" else run(frame, presence)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            times = {name: t[3:] for name, t in times.items()}
            eager_p50 = float(np.percentile(times["eager"], 50))
            for name, label, precision in (("eager", "PyTorch eager (seed style)", "FP32"),
                                           ("fp32", "kiosk (ONNX Runtime)", "FP32"),
                                           ("int8", "kiosk (ONNX Runtime)", "INT8")):
                p50, p95 = np.percentile(times[name], [50, 95])
                rows.append({"model": f"{arch} {args.size}px", "pipeline": label,
                             "precision": precision, "p50 ms": float(p50),
                             "p95 ms": float(p95), "speed-up vs eager": eager_p50 / p50})
            print(format_table(rows[-3:], COLUMNS, {"p50 ms": ".1f", "p95 ms": ".1f",
                                                    "speed-up vs eager": ".2f"}), flush=True)
    formats = {"p50 ms": ".1f", "p95 ms": ".1f", "speed-up vs eager": ".2f"}
    print(format_table(rows, COLUMNS, formats))
    if not args.no_docs:
        body = (f"One scan from a 1280x720 RGB frame to a result, {len(frames)} frames with a "
                "product held still (synthetic scan video), pipelines timed alternately frame "
                "by frame. Kiosk = presence check + square crop around the product + "
                "preprocess + ONNX Runtime (flip averaging inside the model, as exported) + "
                "catalog match over the data's products; eager = resize + centre crop + "
                "normalise + the same network in PyTorch FP32 eager mode, one forward pass, "
                "softmax top-1. Networks are untrained (time does not depend on the weights); "
                f"INT8 calibrated on {args.calibration_photos} training photos.\n\n"
                + format_markdown_table(rows, COLUMNS, formats))
        write_docs(args, "latency", "Kiosk scan latency", body)


if __name__ == "__main__":
    main()
