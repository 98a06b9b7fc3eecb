"""Architectures compared on the Grocery Store data: accuracy, size, compute, train time, latency.

    python bench/compare.py --data ../shared/data/grocery \
        --archs resnet18,resnet50,efficientnet_lite0 --epochs 4

Runs `storyscan compare`: each architecture trains with `storyscan train`'s loop on the same
split, exports with `storyscan export`, and is measured as the kiosk runs it (INT8 accuracy on
every val photo, batch-1 INT8 latency on ONNX Runtime's CPU engine). The table goes to stdout
and, unless --no-docs, to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_docs_args, write_docs
from models.weights import WeightsError
from trainer.compare import CompareConfig, compare, markdown_table, table

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--archs", default="resnet18,resnet50,efficientnet_lite0",
                   help="comma-separated ARCH or ARCH:WEIGHTS (imagenet, none or a checkpoint)")
    p.add_argument("--weights", default="imagenet", help="weights of archs given without one")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for training and the latency runs (0 = all cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-compare"))
    add_docs_args(p)
    args = p.parse_args()
    if not args.data.is_dir():
        sys.exit(f"bench/compare.py: {args.data}: data not found (--data)")
    cfg = CompareConfig(data=str(args.data), archs=args.archs.split(","), weights=args.weights,
                        out=str(args.out), size=args.size, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    try:
        results = compare(cfg)
    except WeightsError as e:  # offline, torch.hub cannot fetch ResNet's ImageNet weights
        sys.exit(f"bench/compare.py: {e}")
    print(table(results))
    if args.no_docs:
        return
    threads = f"{args.threads} threads" if args.threads else "one thread per core"
    body = (
        f"`{args.data.name}`: every architecture trained on `train` with the same split, seed "
        f"and recipe (epochs {args.epochs}, {args.size} px, batch {args.batch_size}, SGD lr "
        f"{args.lr}, heads x10, cosine schedule), exported with `storyscan export` (INT8 "
        f"calibrated on training photos) and measured on all {results[0].val_photos} val photos. "
        "Accuracy is product top-1/top-5/macro-F1 of the INT8 bundle, FP32 top-1 beside it. "
        "Parameters and MACs count the layers a photo passes through (Conv2d and Linear MACs, "
        f"at {args.size} px). `INT8 p50 ms` is the median batch-1 time of the INT8 model on "
        f"ONNX Runtime's CPU engine ({threads}), after warm-up, network only. `train "
        "min` is wall-clock, photo checks included; on a shared machine it varies with load.\n\n"
        + markdown_table(results)
    )
    write_docs(args, "compare", "Architectures compared", body)


if __name__ == "__main__":
    main()
