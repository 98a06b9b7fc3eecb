"""Accuracy on the Grocery Store data: train on `train`, report `val`, FP32 and INT8.

    python bench/accuracy.py --data ../shared/data/grocery \
        --run efficientnet_lite0:imagenet:224:4 --run resnet18:none:224:8

Each --run is ARCH:WEIGHTS:SIZE:EPOCHS. Every run trains with `storyscan train`'s loop, exports
with `storyscan export` (INT8 calibrated on training photos) and evaluates both precisions of
the bundle on every val photo. The table goes to stdout and to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_docs_args, write_docs
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.export import ExportConfig, export
from trainer.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
COLUMNS = ["arch", "init", "size", "epochs", "train min", "precision", "fine top-1",
           "fine top-5", "coarse top-1", "macro-F1", "INT8/FP32 agree", "model MB"]


def run_one(spec: str, data: Path, out: Path, batch_size: int, lr: float
            ) -> tuple[list[dict], dict]:
    arch, weights, size, epochs = spec.split(":")
    name = f"{arch}-{weights}-{size}-{epochs}"
    t0 = time.time()
    best = train(TrainConfig(data=str(data), out=str(out / name), arch=arch, weights=weights,
                             size=int(size), epochs=int(epochs), batch_size=batch_size, lr=lr))
    minutes = (time.time() - t0) / 60
    bundle = export(ExportConfig(checkpoint=str(best), data=str(data),
                                 out=str(out / f"{name}-bundle"), name=name, force=True))
    m = bundle.manifest["metrics"]
    rows = []
    for precision in ("fp32", "int8"):
        r = m[precision]
        rows.append({
            "arch": arch, "init": weights, "size": int(size), "epochs": int(epochs),
            "train min": minutes, "precision": precision.upper(),
            "fine top-1": r["fine_top1"], "fine top-5": r["fine_top5"],
            "coarse top-1": r["coarse_top1"], "macro-F1": r["fine_macro_f1"],
            "INT8/FP32 agree": m["int8_fp32_agreement"] if precision == "int8" else None,
            "model MB": bundle.model_path(precision).stat().st_size / 2**20,
        })
    return rows, bundle.manifest["quantization"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--run", action="append", dest="runs",
                   help="ARCH:WEIGHTS:SIZE:EPOCHS (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    add_docs_args(p)
    args = p.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"bench/accuracy.py: {args.data}: Grocery Store data not found (--data)")
    runs = args.runs or ["efficientnet_lite0:imagenet:224:4", "resnet18:none:224:8"]
    rows, quantization = [], {}
    for spec in runs:
        run_rows, quantization = run_one(spec, args.data, args.out, args.batch_size, args.lr)
        rows += run_rows
    formats = {"train min": ".1f", "model MB": ".1f", "fine top-1": ".1%", "fine top-5": ".1%",
               "coarse top-1": ".1%", "macro-F1": ".3f", "INT8/FP32 agree": ".1%"}
    print(format_table(rows, COLUMNS, formats))
    q = quantization
    body = (
        f"Grocery Store data set: trained on `train` (2,640 photos), measured on all of `val` "
        f"(296 photos, 81 products, 43 categories). Batch {args.batch_size}, SGD lr "
        f"{args.lr} (heads x10), cosine schedule, CosFace margin {TrainConfig.margin}, "
        f"catalog photos as extra views x{TrainConfig.reference_views} (the recipe of "
        f"bench/recipe.py); INT8 is ONNX Runtime static {q['format']}, "
        f"{q['weights']} weights, {q['activations']} activations, {q['calibration']} "
        f"calibration on {q['calibration_photos']} training photos, FP32: {q['fp32_layers']}. "
        "`train min` is wall-clock, photo checks included; on a shared machine it varies with "
        "load.\n\n"
        + format_markdown_table(rows, COLUMNS, formats)
    )
    write_docs(args, "accuracy", "Accuracy on Grocery Store val", body)


if __name__ == "__main__":
    main()
