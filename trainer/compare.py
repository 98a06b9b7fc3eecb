"""Compare architectures on one data set: accuracy, size, compute, training time, kiosk latency.

Every architecture is trained with `storyscan train`'s loop on the same split and seed, exported
with `storyscan export`, and measured the way the kiosk runs it: accuracy of the INT8 bundle on
every validation photo, and the batch-1 latency of its INT8 model on ONNX Runtime's CPU engine,
with the same thread count for every architecture. Parameters and MACs are counted on the torch
model with forward hooks, so they cover exactly the layers a photo passes through (not the
backbone's unused ImageNet classifier, which the bundle does not contain either).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from device.engines.ort import OrtEngine
from models.recognizer import build_backbone
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.export import ExportConfig, export
from trainer.ingest import read_layout
from trainer.train import load_checkpoint, train

# Result field -> table column. Accuracy is that of the INT8 bundle, which is what the kiosk runs.
COLUMNS = {"arch": "arch", "weights": "weights", "int8_top1": "INT8 top-1",
           "int8_top5": "INT8 top-5", "int8_macro_f1": "INT8 macro-F1",
           "fp32_top1": "FP32 top-1", "params_m": "params M", "gmacs": "GMACs",
           "train_min": "train min", "latency_ms": "INT8 p50 ms"}
FORMATS = {"INT8 top-1": ".1%", "INT8 top-5": ".1%", "INT8 macro-F1": ".3f",
           "FP32 top-1": ".1%", "params M": ".2f", "GMACs": ".2f", "train min": ".1f",
           "INT8 p50 ms": ".1f"}


@dataclass
class CompareConfig:
    data: str  # folder tree or Grocery-Store list files, see trainer/ingest.py
    archs: list[str] = field(default_factory=lambda: ["resnet18", "resnet50",
                                                      "efficientnet_lite0"])  # ARCH[:WEIGHTS]
    weights: str = "imagenet"  # for archs given without ':WEIGHTS'
    out: str = "runs/compare"
    size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    threads: int = 0  # CPU threads for training and for the latency runs; 0 = all cores
    seed: int = 0


@dataclass
class Result:
    arch: str
    weights: str
    int8_top1: float
    int8_top5: float
    int8_macro_f1: float
    fp32_top1: float
    params_m: float
    gmacs: float
    train_min: float
    latency_ms: float
    val_photos: int
    bundle: str


def parse_runs(archs: list[str], default_weights: str) -> list[tuple[str, str]]:
    """'ARCH' or 'ARCH:WEIGHTS' (imagenet | none | a checkpoint path) -> (arch, weights)."""
    runs = []
    for item in archs:
        arch, _, weights = item.strip().partition(":")
        runs.append((arch, weights or default_weights))
    return runs


# --- counting ----------------------------------------------------------------------------------


def _forward_once(model: nn.Module, size: int, hook: Callable[..., None]) -> None:
    """One eval-mode forward pass of a size x size input, with `hook` after every module."""
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates for one size x size photo in the Conv2d and Linear layers, which do
    all but a sliver of a CNN's arithmetic (bias adds, BN, activations are left out)."""
    macs = 0

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            macs += output.numel() * (m.in_channels // m.groups) * k
        elif isinstance(m, nn.Linear):
            macs += output.numel() * m.in_features

    _forward_once(model, size, hook)
    return macs


def count_params(model: nn.Module, size: int) -> int:
    """Parameters of the modules a forward pass runs: what the exported model holds."""
    used: dict[int, nn.Parameter] = {}

    def hook(m: nn.Module, inputs: tuple, output: object) -> None:
        used.update((id(p), p) for p in m.parameters(recurse=False))

    _forward_once(model, size, hook)
    return sum(p.numel() for p in used.values())


def latency_ms(model: Path, size: int, threads: int, runs: int = 50, warmup: int = 10) -> float:
    """Median batch-1 time of an ONNX model on ONNX Runtime's CPU engine, after warm-up. A CNN's
    time does not depend on what the photo shows, so a fixed random input stands in for one."""
    engine = OrtEngine(model, "int8", threads)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    times = []
    for _ in range(warmup + runs):
        t0 = time.perf_counter()
        engine.infer(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[warmup:]) * 1e3)


# --- the comparison ----------------------------------------------------------------------------


def compare(cfg: CompareConfig) -> list[Result]:
    """Train, export and measure each architecture in turn. OUT/compare.json is rewritten after
    each one, so an interrupted comparison keeps the architectures it finished."""
    runs = parse_runs(cfg.archs, cfg.weights)
    read_layout(cfg.data)  # a wrong data folder fails now, not after the weights are fetched
    for arch, weights in runs:  # every name and download checked before hours of training
        build_backbone(arch, weights)
    out = Path(cfg.out)
    results: list[Result] = []
    for i, (arch, weights) in enumerate(runs, 1):
        step = f"[{i}/{len(runs)}] {arch}"
        name = f"{arch}-{weights if weights in ('imagenet', 'none') else Path(weights).stem}"
        print(f"{step}: training (weights: {weights})", flush=True)
        t0 = time.time()
        best = train(TrainConfig(data=cfg.data, out=str(out / name), arch=arch, weights=weights,
                                 size=cfg.size, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 lr=cfg.lr, seed=cfg.seed, threads=cfg.threads))
        train_min = (time.time() - t0) / 60
        print(f"{step}: exporting", flush=True)
        bundle = export(ExportConfig(checkpoint=str(best), data=cfg.data,
                                     out=str(out / f"{name}-bundle"), name=name, force=True))
        print(f"{step}: counting and timing", flush=True)
        model, _ = load_checkpoint(best)
        m = bundle.manifest["metrics"]
        results.append(Result(
            arch=arch, weights=weights, int8_top1=m["int8"]["fine_top1"],
            int8_top5=m["int8"]["fine_top5"], int8_macro_f1=m["int8"]["fine_macro_f1"],
            fp32_top1=m["fp32"]["fine_top1"], params_m=count_params(model, cfg.size) / 1e6,
            gmacs=count_macs(model, cfg.size) / 1e9, train_min=train_min,
            latency_ms=latency_ms(bundle.model_path("int8"), cfg.size, cfg.threads),
            val_photos=m["val_photos"], bundle=str(bundle.path)))
        print(table(results[-1:]), flush=True)
        (out / "compare.json").write_text(json.dumps(
            {"config": asdict(cfg), "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return results


def _rows(results: list[Result]) -> list[dict]:
    return [{column: getattr(r, key) for key, column in COLUMNS.items()} for r in results]


def table(results: list[Result]) -> str:
    return format_table(_rows(results), list(COLUMNS.values()), FORMATS)


def markdown_table(results: list[Result]) -> str:
    return format_markdown_table(_rows(results), list(COLUMNS.values()), FORMATS)
