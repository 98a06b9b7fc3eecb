"""Training speed: seconds per step of `storyscan train`'s loop, per way of running it.

    python bench/train_speed.py --arch efficientnet_lite0 --size 224

One SGD step on a batch of 32 random photos (forward through backbone and heads, the CosFace
loss, backward, update), timed for FP32 in the default memory layout (what the trainer did
before), channels-last, frozen leading stages, and bf16 autocast, each as a ratio to the first
row; the row `storyscan train --precision auto` runs at that input size is marked "shipped".
The rows are timed in rounds, one step of each per round, so a load that comes and goes hits
them all alike; the median step counts. The table goes to stdout and to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.report import add_docs_args, write_docs
from models.recognizer import build_recognizer
from models.tables import format_markdown_table, format_table
from trainer.config import CPU_BF16_FROM_PX
from trainer.train import freeze_stages, native_bf16, pick_precision

COLUMNS = ["variant", "layout", "precision", "frozen stages", "s/step", "photos/s", "vs FP32"]
# (name, channels-last, precision, frozen stages)
VARIANTS = [
    ("FP32, contiguous (before)", False, "fp32", 0),
    ("channels-last", True, "fp32", 0),
    ("channels-last + 3 stages frozen", True, "fp32", 3),
    ("channels-last + bf16 + 3 stages frozen", True, "bf16", 3),
]


def make_step(arch: str, size: int, batch: int, channels_last: bool, precision: str,
              frozen: int) -> Callable[[], None]:
    """A closure running one training step as trainer/train.py does; "bf16" autocasts even
    where the CPU only emulates bf16."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_recognizer(arch, 81, 43, "imagenet").to(memory_format=layout).train()
    for m in freeze_stages(model, frozen):
        m.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 81, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype or torch.float32, dtype is not None):
            _, fine, _ = model(x)
        fine = fine.float() - model.scale * 0.2 * F.one_hot(y, fine.shape[1])
        loss = F.cross_entropy(fine, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", dest="archs",
                   help="architecture (repeatable; default efficientnet_lite0 and _lite2)")
    p.add_argument("--size", type=int, action="append", dest="sizes",
                   help="input side per --arch (default 224 and 260)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    add_docs_args(p)
    args = p.parse_args()
    archs = args.archs or ["efficientnet_lite0", "efficientnet_lite2"]
    sizes = args.sizes or [224, 260][: len(archs)]
    if len(sizes) != len(archs):
        raise SystemExit("give one --size per --arch")

    native = native_bf16(torch.device("cpu"))
    rows = []
    for arch, size in zip(archs, sizes, strict=True):
        steps = [make_step(arch, size, args.batch_size, *v[1:]) for v in VARIANTS]
        shipped = ("bf16" if pick_precision("auto", torch.device("cpu"), size) else "fp32", 3)
        for step in steps:  # warm-up: oneDNN picks its kernels on the first call
            step()
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(args.rounds):
            for step, t in zip(steps, times, strict=True):
                t0 = time.perf_counter()
                step()
                t.append(time.perf_counter() - t0)
        base = statistics.median(times[0])
        for (name, cl, precision, frozen), t in zip(VARIANTS, times, strict=True):
            s = statistics.median(t)
            rows.append({"variant": f"{arch} {size} px: {name}"
                         + (" (shipped)" if (precision, frozen) == shipped else ""),
                         "layout": "channels-last" if cl else "contiguous",
                         "precision": ("FP32" if precision == "fp32" else "bf16 autocast"
                                       if native else "bf16 autocast, emulated"),
                         "frozen stages": frozen, "s/step": s,
                         "photos/s": args.batch_size / s, "vs FP32": base / s})
    print(format_table(rows, COLUMNS))
    if args.no_docs:
        return
    body = (f"One training step (batch {args.batch_size}, random photos, forward + CosFace loss "
            f"+ backward + SGD update) of each variant, timed in {args.rounds} interleaved "
            f"rounds, median; `vs FP32` is the speed-up over the first row of the same "
            f"architecture, measured in the same run. bf16 autocast keeps FP32 master weights; "
            f"frozen stages are the stem and the first two stages of blocks, left at their "
            f"ImageNet weights. The shipped row is what `--precision auto` runs: bf16 autocast "
            f"where the CPU computes bf16 natively (AVX512-BF16 or AMX; "
            f"{'this one does' if native else 'this one does not, and emulates it'}), it was "
            f"measured to pay (AMX, or AVX512-BF16 on an AMD CPU) and the input side is at "
            f"least {CPU_BF16_FROM_PX} px, FP32 otherwise."
            f"\n\n{format_markdown_table(rows, COLUMNS)}")
    write_docs(args, "train-speed", "Training speed", body)


if __name__ == "__main__":
    main()
