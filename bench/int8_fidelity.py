"""INT8 fidelity: how each quantisation choice changes agreement with FP32 and accuracy.

    python bench/int8_fidelity.py --checkpoint runs/bench-accuracy/<run>/best.pt \
        --data ../shared/data/grocery

One trained checkpoint, exported once to FP32 ONNX as `storyscan export` does (with flip
test-time augmentation unless --no-flip); then one INT8 model per variant (calibration
method, calibration set size, activation type, per-channel or per-tensor weights, which
convolutions stay FP32: the leading ones, the most sensitive ones, the depthwise ones), each
checked on every val photo against FP32: top-1 agreement, the mean KL divergence of the product
probabilities from FP32's (smooth where agreement counts a handful of flips), mean embedding
cosine, accuracy and its drop, and batch-1 CPU time, in ms and as a ratio to FP32, every
model timed together at the end (`latency`). The first INT8 row is what `storyscan export`
does by default; every other row changes one thing. Rows that differ only in how many
sensitive convolutions stay FP32 share one ranking.

Two FP32 rows before them are the noise floor: FP32 against itself on the same photos moved by
one pixel, or given one grey level of sensor noise. A photo whose top-1 flips under a change
that small sits on a tie between two products, and INT8 cannot be expected to keep it either.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_docs_args, write_docs
from device.engines import infer_all
from device.engines.ort import OrtEngine
from models.preprocess import InputSpec, prepare
from models.recognizer import FlipAveraged
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.export import calibration_subset, export_onnx
from trainer.ingest import IngestReport, drop_products, load_split, read_layout
from trainer.quantize import QuantOptions, quantize_int8, score_divergence
from trainer.train import holdout_products, load_checkpoint

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
COLUMNS = ["variant", "calib photos", "agreement", "score KL", "embedding cos", "top-1",
           "drop pp", "batch-1 ms", "time vs FP32"]
DEFAULT = QuantOptions()  # what `storyscan export` ships
# training options that change the model, named in the report when not the defaults
RECIPE = ("margin", "scale", "label_smoothing", "cutmix", "erasing", "camera", "crop_scale",
          "ema", "probe_epochs", "frozen_stages", "reference_views", "holdout")
VARIANTS: list[tuple[str, QuantOptions, int]] = [
    (f"default (first {DEFAULT.fp32_convs} convs FP32, minmax, uint8 act., per-channel)",
     DEFAULT, 256),
    ("every conv INT8", replace(DEFAULT, fp32_convs=0), 256),
    *[(f"first {DEFAULT.fp32_convs} + {n} most sensitive convs FP32",
       replace(DEFAULT, fp32_sensitive=n), 256) for n in (3, 6, 10)],
    ("first 10 convs FP32", replace(DEFAULT, fp32_convs=10), 256),
    ("first 20 convs FP32", replace(DEFAULT, fp32_convs=20), 256),
    ("depthwise convs FP32", replace(DEFAULT, fp32_convs=0, fp32_depthwise=True), 256),
    ("percentile calibration", replace(DEFAULT, calibration="percentile"), 256),
    ("entropy calibration", replace(DEFAULT, calibration="entropy"), 256),
    ("64 calibration photos", DEFAULT, 64),
    ("1024 calibration photos", DEFAULT, 1024),
    ("int8 symmetric activations", replace(DEFAULT, symmetric_activations=True), 256),
    ("per-tensor weights", replace(DEFAULT, per_channel=False), 256),
    ("first 4 convs FP32", replace(DEFAULT, fp32_convs=4), 256),
    ("7-bit weights (no int16 saturation without VNNI)", replace(DEFAULT, reduce_range=True),
     256),  # last: keeps rows' numbers
]


def latency(engines: dict[str, OrtEngine], inputs: list[np.ndarray], rounds: int = 6,
            block: int = 20, warm: int = 2) -> dict[str, float]:
    """Median batch-1 time in ms of every engine, all timed in one loop so machine noise hits
    them alike: blocks of `block` photos, engine after engine, the order rotated each round,
    the first `warm` photos of a block untimed (the previous engine's threads are still
    spinning down then). Timed photo by photo in turn against FP32, a row at a time, FP32's
    own median moved between 24 and 44 ms from row to row of one run."""
    names = list(engines)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            for i, x in enumerate(inputs[:block]):
                t0 = time.perf_counter()
                engines[k].infer(x[None])
                if i >= warm:
                    times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1000 for k, v in times.items()}


def against(out: dict[str, np.ndarray], ref: dict[str, np.ndarray], y: np.ndarray) -> dict:
    """Agreement, embedding cosine, top-1 and drop of `out` against the FP32 outputs `ref`."""
    top1 = float(np.mean(out["fine"].argmax(1) == y))
    return {"agreement": float(np.mean(out["fine"].argmax(1) == ref["fine"].argmax(1))),
            "score KL": score_divergence(ref["fine"], out["fine"]),
            "embedding cos": float(np.mean(np.sum(out["embedding"] * ref["embedding"], 1))),
            "top-1": top1, "drop pp": (float(np.mean(ref["fine"].argmax(1) == y)) - top1) * 100}


def noise_floor(reference: OrtEngine, images: list[np.ndarray], spec: InputSpec,
                ref: dict[str, np.ndarray], y: np.ndarray) -> list[dict]:
    """FP32 against itself on imperceptibly changed inputs: shifted one pixel to the left
    (edge column repeated), and Gaussian noise of one grey level."""
    rng = np.random.default_rng(0)
    grey = (1.0 / np.asarray(spec.std, np.float32))[:, None, None]
    changes = {
        "FP32, photo shifted 1 px (noise floor)":
            lambda x: np.concatenate([x[:, :, 1:], x[:, :, -1:]], axis=2),
        "FP32, 1 grey level of noise (noise floor)":
            lambda x: x + grey * rng.standard_normal(x.shape).astype(np.float32),
    }
    rows = []
    for name, change in changes.items():
        out = infer_all(reference, [change(x) for x in images])
        rows.append({"variant": name, "calib photos": None, **against(out, ref, y)})
        print(format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="export the plain model, without flip test-time augmentation")
    p.add_argument("--variants", help="only these rows (comma-separated numbers, 1 = default)")
    add_docs_args(p)  # the bench's own section: int8-fidelity-ARCH-SIZE
    args = p.parse_args()
    variants = ([VARIANTS[int(i) - 1] for i in args.variants.split(",")] if args.variants
                else VARIANTS)
    model, ckpt = load_checkpoint(args.checkpoint)
    spec = InputSpec.from_dict(ckpt["input"])
    labels, train, val = read_layout(args.data)
    held = holdout_products(ckpt["config"].get("holdout", ""))
    if held:  # a --holdout model: measured on the products it was trained on
        labels, (train, val) = drop_products(labels, [train, val], held)
    to_input = lambda img: prepare(img, spec)  # noqa: E731
    val = load_split(val, to_input, IngestReport(), {}, "validation photos")
    y = np.array(val.fine)
    pools = {n: load_split(calibration_subset(train, n, len(labels.fine)), to_input,
                           IngestReport(), {}, f"{n} calibration photos")
             for n in sorted({n for _, _, n in variants})}

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(FlipAveraged(model) if args.flip else model, spec, fp32)
        reference = OrtEngine(fp32, "fp32")
        ref = infer_all(reference, val.images)
        ref_top1 = float(np.mean(ref["fine"].argmax(1) == y))
        rows = [{"variant": "FP32 reference", "top-1": ref_top1}]
        rows += noise_floor(reference, val.images, spec, ref, y)
        rankings: dict[tuple[int, QuantOptions], list[str]] = {}
        engines = {"FP32 reference": reference}
        for i, (name, options, count) in enumerate(variants):
            int8 = Path(tmp) / f"int8-{i}.onnx"
            key = (count, replace(options, fp32_sensitive=0))
            ranking = quantize_int8(fp32, int8, pools[count].images, options,
                                    rankings.get(key))
            if ranking:  # a row keeping no sensitive convolution ranks none
                rankings[key] = ranking
            engines[name] = OrtEngine(int8, "int8")
            out = infer_all(engines[name], val.images)
            rows.append({"variant": name, "calib photos": len(pools[count]),
                         **against(out, ref, y)})
            print(format_table(rows[-1:], COLUMNS), flush=True)
        print(f"timing {len(engines)} models together, batch 1", flush=True)
        ms = latency(engines, val.images)
        for row in rows:
            if row["variant"] in ms:
                row["batch-1 ms"] = ms[row["variant"]]
                row["time vs FP32"] = ms[row["variant"]] / ms["FP32 reference"]

    formats = {"agreement": ".1%", "score KL": ".4f", "embedding cos": ".4f", "top-1": ".1%",
               "drop pp": "+.1f", "batch-1 ms": ".1f", "time vs FP32": ".2f"}
    print(format_table(rows, COLUMNS, formats))
    arch, size = ckpt["config"]["arch"], spec.size
    config = ckpt["config"]
    recipe = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items()
                       if k in RECIPE and v != getattr(TrainConfig, k))
    body = (f"{arch} at {size} px trained by `storyscan train`"
            + (f" with `{recipe}`" if recipe else "")
            + f", epoch {ckpt['epoch']} of {config['epochs']} (`{args.checkpoint}`), "
            + ("with flip test-time augmentation as exported, " if args.flip else "")
            + f"every val photo ({len(val)}). Agreement is INT8-vs-FP32 "
            "top-1 product; score KL the mean KL divergence of INT8's product probabilities "
            "from FP32's; `batch-1 ms` is the median ONNX Runtime CPU time of one photo, every "
            "model timed together at the end in rotating blocks of 20 photos (6 rounds), and "
            "`time vs FP32` its ratio to FP32's. Sensitive "
            "convolutions are ranked on calibration (training) photos, never on val.\n\n"
            + format_markdown_table(rows, COLUMNS, formats))
    write_docs(args, f"int8-fidelity-{arch}-{size}", f"INT8 fidelity ({arch}, {size} px)", body)


if __name__ == "__main__":
    main()
